"""
Seeing inside a running cluster: per-method latency histograms
(L{skynet.observe.histogram}), structured logs searched across hosts
(L{skynet.observe.logs}, L{skynet.observe.logsearch}), and the C{sky}
commands over them (L{skynet.observe.commands}).

The modules of other owners call in here through a few commented hooks
(see docs/observability.md); nothing here imports them at module level
beyond the records it needs.
"""
