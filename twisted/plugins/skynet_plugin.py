"""
The twistd plugins of skynet.  Declarative only: the tap modules are named
as strings, so C{twistd --help} imports nothing heavy.
"""

from twisted.application.service import ServiceMaker

skynet_service = ServiceMaker(
    "skynet-service",
    "skynet.service_tap",
    "Run a skynet service instance (BSON-RPC, registered for discovery).",
    "skynet-service",
)

skynet_daemon = ServiceMaker(
    "skynet-daemon",
    "skynet.daemon_tap",
    "Run the skynet daemon of this host: deploy, supervise and guard its services.",
    "skynet-daemon",
)

skynet_dashboard = ServiceMaker(
    "skynet-dashboard",
    "skynet.dashboard_tap",
    "Serve the live web dashboard and Prometheus metrics of a skynet cluster.",
    "skynet-dashboard",
)
