"""
The live web dashboard and metrics export (C{twistd skynet-dashboard}).

L{skynet.web.model.DashboardModel} watches a registry and keeps the live
model; L{skynet.web.app.DashboardApp} serves the page, its WebSocket, a JSON
API and C{/metrics} on one port; L{skynet.web.metrics} renders Prometheus
text and pushes to Graphite.  See C{docs/dashboard.md}.
"""
