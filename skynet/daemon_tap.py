"""
C{twistd skynet-daemon}: the per-host daemon.

    twistd -n skynet-daemon [--registry URL] [--listen ENDPOINT] [--admin ENDPOINT] \\
        [--state FILE] [--deploy FILE] [--log-dir DIR] [guard thresholds...]

See C{docs/daemon.md} and L{skynet.daemon}.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from skynet import tls  # security hook (issue 12)
from skynet.config import environment_defaults, skynet_path, tune_malloc
from skynet.daemon import (
    Daemon,
    GuardConfig,
    ProbeConfig,
    PsutilSampler,
    load_reading,
    load_state,
    parse_deploy_file,
)
from skynet.taps import (
    ZK_SESSION_TIMEOUT_OPTION,
    number,
    open_registry,
    run_plugin,
    service_endpoints,
)


def default_log_dir() -> str:
    """
    C{$SKYNET_HOME/logs}, else C{~/.skynet/logs}.
    """
    return skynet_path("logs")


def with_session_timeout(url: str, timeout: Any) -> str:
    """
    The zk:// URL C{url} with C{session_timeout=timeout} (in place of one it
    has: the option wins, as for the daemon itself), so that the children
    get the daemon's session timeout through their URL.
    """
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k != "session_timeout"]  # fmt: skip
    query.append(
        ("session_timeout", f"{timeout:g}" if isinstance(timeout, float) else str(timeout))
    )
    return urlunsplit(parts._replace(query=urlencode(query, safe="/,:")))


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the skynet daemon of this host: the SkynetDaemon service, which deploys, "
        "supervises, restarts and guards this host's service instances. See docs/daemon.md."
    )

    optParameters = [
        ["registry", "r", None,
         "Registry URL: file:///path or zk://host:port,.../chroot (default $SKYNET_REGISTRY, "
         "else the embedded registry). The children get the same."],
        ZK_SESSION_TIMEOUT_OPTION,
        ["listen", "l", None,
         "Endpoint of the SkynetDaemon service (default: $SKYNET_BIND_IP and the first free "
         "port of $SKYNET_MIN_PORT..$SKYNET_MAX_PORT)."],
        ["admin", None, "tcp:0:interface=127.0.0.1",
         "Endpoint of the daemon's admin listener, or 'none'."],
        ["state", None, None,
         "State file: what is deployed, kept across daemon restarts (same uuids)."],
        ["deploy", None, None,
         "Deployment file: one service per line, 'module:Class args...', deployed at start."],
        ["log-dir", None, None,
         "Directory of the children's log files (default $SKYNET_HOME/logs, else "
         "~/.skynet/logs)."],
        ["stats-interval", None, 5.0, "Seconds between statistics updates in the registry.",
         number("stats-interval", positive=True)],
        ["stable-after", None, 10.0,
         "Seconds a child must stay up for a death not to count as a crash loop; quicker "
         "deaths back off 1, 2, 4 ... s.", number("stable-after")],
        ["max-restart-delay", None, 60.0, "Cap of the restart back-off, in seconds.",
         number("max-restart-delay", minimum=1)],
        ["stop-grace", None, 15.0,
         "Seconds a child gets after Admin.Stop (to drain) before SIGTERM.", number("stop-grace")],
        ["kill-time", None, 5.0, "Seconds a child gets after SIGTERM before SIGKILL.",
         number("kill-time")],
        ["start-timeout", None, 15.0,
         "Seconds Deploy waits for a new child to register (or fail) before it answers; a "
         "child that ends first, or takes longer, fails the call (0: answer at once).",
         number("start-timeout")],
        ["sample-interval", None, 2.0, "Seconds between the guards' samples.",
         number("sample-interval", positive=True)],
        ["child-max-cpu", None, 0.0,
         "A child's CPU percent (100 = one core) that, sustained, gets it restarted "
         "(0: off).", number("child-max-cpu")],
        ["child-max-rss", None, 0.0,
         "A child's resident memory in MiB that, sustained, gets it restarted (0: off).",
         number("child-max-rss")],
        ["child-samples", None, 3, "Consecutive samples over a child threshold before acting.",
         number("child-samples", int, minimum=1)],
        ["load-source", None, "loadavg",
         "What the host guard reads: loadavg (1-minute load average), cpu (host CPU percent) "
         "or file:PATH (a number in a file)."],
        ["load-high", None, 0.0,
         "High-water mark of the load reading: above it for --load-samples samples, this "
         "host's instances are unregistered (0: off).", number("load-high")],
        ["load-low", None, None,
         "Low-water mark: below it for --load-samples samples, they are registered again "
         "(default: half the high-water mark).", number("load-low")],
        ["load-samples", None, 3, "Consecutive samples beyond a mark before acting.",
         number("load-samples", int, minimum=1)],
        ["probe-interval", None, 2.0,
         "Seconds between two liveness probes (an Admin.Ping on its admin listener) of each "
         "child in the registry (0: no probes).", number("probe-interval")],
        ["probe-timeout", None, 1.0, "Seconds a probe waits for its answer.",
         number("probe-timeout", positive=True)],
        ["probe-failures", None, 3,
         "Failed probes in a row after which a child is unregistered, killed and restarted.",
         number("probe-failures", int, minimum=1)],
        ["probe-max-lag", None, 0.0,
         "A child's reactor lag (seconds, its ReactorLag statistic) above which a probe "
         "counts as failed (0: not looked at).", number("probe-max-lag")],
        ["max-events", None, 1000, "How many recent events the daemon keeps in memory.",
         number("max-events", int, minimum=1)],
        ["capacity", None, None,
         "How many instances the cluster may place on this host (published as Host.capacity "
         "in its statistics; default: no limit). See docs/cluster.md.", number("capacity", int)],
        ["cluster-interval", None, 2.0, "Seconds between two passes of the cluster's reconciler "
         "(while this daemon leads).", number("cluster-interval", positive=True)],
        ["cluster-list-interval", None, 30.0,
         "Seconds between two listings of every daemon's children by the reconciler.",
         number("cluster-list-interval", positive=True)],
        ["authorized-keys", None, None,
         "The SSH shell's authorized_keys file (default $SKYNET_HOME/ssh/authorized_keys)."],
        ["host-key", None, None,
         "The SSH shell's host key, made on first start with mode 0600 (default "
         "$SKYNET_HOME/ssh/host_key)."],
    ]  # fmt: skip

    optFlags = [
        [
            "no-cluster",
            None,
            "Take no part in the cluster: do not campaign for its leadership nor run its "
            "reconciler (this daemon's host is still placed on). See docs/cluster.md.",
        ],
    ]

    def opt_ssh(self, endpoint: str) -> None:
        """Serve the SSH shell on this endpoint (127.0.0.1 unless it names an interface); repeatable."""
        self.setdefault("ssh", []).append(endpoint)

    registry: Any
    deployments: list
    daemon_uuid: str | None

    def postOptions(self) -> None:
        # The numbers are checked by their rows' coerce column (skynet.taps.number).
        self.probes = ProbeConfig(interval=self["probe-interval"], timeout=self["probe-timeout"],
                                  failures=self["probe-failures"],
                                  max_lag=self["probe-max-lag"] or None)  # fmt: skip
        if self["load-low"] is not None:
            if not self["load-high"]:
                raise usage.UsageError("--load-low needs --load-high")
        try:
            self.guards = GuardConfig(
                sample_interval=self["sample-interval"],
                child_max_cpu=self["child-max-cpu"] or None,
                child_max_rss=int(self["child-max-rss"] * 1024 * 1024) or None,
                child_samples=self["child-samples"],
                load_high=self["load-high"] or None,
                load_low=self["load-low"],
                load_samples=self["load-samples"],
            )
        except ValueError as e:
            raise usage.UsageError(f"guards: {e}") from None
        self.sampler = PsutilSampler()
        try:
            self.load = load_reading(self["load-source"], self.sampler)
        except ValueError as e:
            raise usage.UsageError(f"--load-source: {e}") from None

        self._endpoints()
        self._registry()
        self._files()
        self._ssh()
        self.tls = tls.tap_tls(self)  # security hook (issue 12)

    def _ssh(self) -> None:
        from twisted.internet import reactor

        from skynet.manhole import default_ssh_dir, loopback_unless_told

        self.ssh_endpoints = []
        for spec in self.get("ssh", []):
            try:
                self.ssh_endpoints.append(serverFromString(reactor, loopback_unless_told(spec)))
            except (ValueError, TypeError, KeyError) as e:
                raise usage.UsageError(f"bad --ssh endpoint {spec!r}: {e}") from None
        ssh_dir = default_ssh_dir()
        for name, default in (("authorized-keys", "authorized_keys"), ("host-key", "host_key")):
            self[name] = os.path.abspath(self[name] or os.path.join(ssh_dir, default))

    def _endpoints(self) -> None:
        from twisted.internet import reactor

        self.endpoints, self.admin_endpoints = service_endpoints(
            reactor, self["listen"], self["admin"]
        )

    def _registry(self) -> None:
        from twisted.internet import reactor

        self.registry = open_registry(reactor, self["registry"], self["zk-session-timeout"])
        if self.registry.url.startswith("memory:"):
            raise usage.UsageError(
                "a memory:// registry lives in one process: the daemon's children could not "
                "share it; use file:// or zk://"
            )
        url = self["registry"] or self.registry.url
        if self["zk-session-timeout"] is not None and url.startswith("zk://"):
            url = with_session_timeout(url, self["zk-session-timeout"])
        self.registry_url = url

    def _files(self) -> None:
        self.daemon_uuid = None
        state_deployments: list = []
        if self["state"]:
            self["state"] = os.path.abspath(self["state"])
            if not os.path.isdir(os.path.dirname(self["state"])):
                raise usage.UsageError(f"--state: no directory {os.path.dirname(self['state'])}")
            try:
                state = load_state(self["state"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
            self.daemon_uuid = state.uuid
            state_deployments = list(state.deployments)
        file_deployments: list = []
        if self["deploy"]:
            try:
                file_deployments = parse_deploy_file(self["deploy"])
            except OSError as e:
                raise usage.UsageError(f"--deploy: {e}") from None
            except ValueError as e:
                raise usage.UsageError(f"--deploy: {e}") from None
        known = {d.uuid for d in state_deployments}
        self.deployments = state_deployments + [d for d in file_deployments if d.uuid not in known]
        self["log-dir"] = os.path.abspath(self["log-dir"] or default_log_dir())
        try:
            os.makedirs(self["log-dir"], exist_ok=True)
        except OSError as e:
            raise usage.UsageError(f"--log-dir: {e}") from None


tls.add_tls_options(Options)  # security hook (issue 12): --tls DIR, --insecure
tls.add_deploy_policy_options(Options)  # security hook: --deploy-classes-only, ...


def makeService(options: Options) -> MultiService:
    """
    The daemon, inside a parent L{MultiService} (named C{"daemon"} there),
    so that other services of this process (an SSH shell) can sit beside it
    and find it with C{parent.getServiceNamed("daemon")}.
    """
    tune_malloc()  # large messages: heap reuse, not fresh pages
    from twisted.internet import reactor

    top = MultiService()
    # security hook (issue 12): mutual TLS on the RPC and admin listeners, the policy.
    listeners = tls.tap_listeners("skynet-daemon", options, options.endpoints,
                                  options.admin_endpoints, registry=options.registry,
                                  reactor=reactor, control=True)  # fmt: skip
    for extra_service in listeners.services:
        extra_service.setServiceParent(top)
    defaults = environment_defaults()  # the edge reads SKYNET_VERSION/REGION/BIND_IP
    daemon = Daemon(
        options.registry,
        listeners.endpoints,
        listeners.admin_endpoints,
        reactor=reactor,
        registry_url=options.registry_url,
        uuid=options.daemon_uuid,
        deployments=options.deployments,
        state_path=options["state"],
        log_dir=options["log-dir"],
        stable_after=options["stable-after"],
        max_restart_delay=options["max-restart-delay"],
        stop_grace=options["stop-grace"],
        kill_time=options["kill-time"],
        start_timeout=options["start-timeout"],
        probes=options.probes,
        guards=options.guards,
        load=options.load,
        sampler=options.sampler,
        stats_interval=options["stats-interval"],
        max_events=options["max-events"],
        cluster=not options["no-cluster"],
        capacity=options["capacity"],
        cluster_interval=options["cluster-interval"],
        cluster_list_interval=options["cluster-list-interval"],
        defaults=defaults,
        # security (issue 12): --deploy-classes-only, --deploy-command-prefix
        deploy_check=tls.deploy_policy(options).check,
    )
    daemon.host.instance_extra = listeners.extra  # security hook (issue 12)
    daemon.setName("daemon")
    daemon.setServiceParent(top)
    if options.ssh_endpoints:
        from skynet.manhole import ManholeService

        shell = ManholeService(daemon.registry, options.ssh_endpoints, options["authorized-keys"],
                               options["host-key"], reactor=reactor, daemon=daemon,
                               defaults=defaults)  # fmt: skip
        shell.setName("ssh")
        shell.setServiceParent(top)
    return top


def main(argv: list[str] | None = None) -> None:
    """
    Run as C{python -m skynet.daemon_tap ...}: the same as C{twistd -n}.
    """
    run_plugin("skynet-daemon", argv)


if __name__ == "__main__":
    main()
