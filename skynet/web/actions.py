"""
The dashboard's actions on instances: register, unregister, stop, restart.

An instance supervised by a skynet daemon is acted on through that daemon
(C{RegisterSubService}, C{UnregisterSubService}, C{StopSubService},
C{RestartSubService} with C{{uuid}}), so the daemon knows what was asked;
any other instance through its admin endpoint (Go Skynet's raw
C{Admin.Register {}}, C{Admin.Unregister {}}, C{Admin.Stop
{waitforclients}}).  Restarting needs a daemon: only a supervisor can start
the process again.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from skynet.admin import ADMIN_ACTIONS, DAEMON_ACTIONS, admin_call, call_instance
from skynet.config import default_reactor
from skynet.errors import RemoteCallError, ServiceError

#: The actions the dashboard offers.
ACTIONS = ("register", "unregister", "stop", "restart")


class ActionError(Exception):
    """
    An action could not be done; C{status} is the HTTP status to answer.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class InstanceActions:
    """
    Does the dashboard's actions on the instances of a
    L{skynet.web.model.DashboardModel}.
    """

    log = Logger()

    def __init__(self, model: Any, reactor: Any = None, timeout: float = 10.0) -> None:
        self.model = model
        self.reactor = reactor = default_reactor(reactor)
        self.timeout = timeout

    def describe(self, uuid: str) -> dict[str, bool]:
        """
        Which actions are possible on C{uuid} (restart only with a daemon).
        """
        state = self.model.find(uuid)
        if state is None:
            return dict.fromkeys(ACTIONS, False)
        daemon = self.model.daemon_of(uuid) is not None
        admin = state.instance.admin is not None
        return {a: daemon or (admin and a in ADMIN_ACTIONS) for a in ACTIONS}

    async def perform(self, action: str, uuid: str, who: str = "") -> dict[str, Any]:
        """
        Do C{action} on instance C{uuid}.

        @return: C{{"ok": True, "via": "daemon" | "admin", ...}}.
        @raise ActionError: 404 for an unknown action or instance, 409 when
            it cannot be done this way (no daemon for a restart, no admin
            endpoint), 502 when the instance or daemon refused or failed.
        """
        if action not in ACTIONS:
            raise ActionError(404, f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
        state = self.model.find(uuid)
        if state is None:
            raise ActionError(404, f"no instance {uuid!r}")
        instance = state.instance
        daemon = self.model.daemon_of(uuid)
        via = "daemon" if daemon is not None else "admin"
        try:
            if daemon is not None:
                result = await call_instance(
                    self.reactor, daemon, DAEMON_ACTIONS[action], {"uuid": uuid}, self.timeout
                )
            elif action == "restart":
                raise ActionError(
                    409,
                    "restart needs a skynet daemon supervising the instance; "
                    f"{instance.name} {instance.address} has none (stop it, or run it "
                    "under twistd skynet-daemon)",
                )
            elif instance.admin is None:
                raise ActionError(409, f"{instance.name} {instance.address} has no admin endpoint")
            else:
                method, params = ADMIN_ACTIONS[action]
                await admin_call(self.reactor, instance.admin, method, params, self.timeout,
                                 tls=bool(instance.extra.get("AdminTLS")))  # fmt: skip
                result = {}
        except ActionError as e:
            self.model.add_event(
                "action-refused", f"{action} of {{service}} {{address}}: {e.message}", instance
            )
            raise
        except (RemoteCallError, ServiceError) as e:
            message = f"{action} of {instance.name} {instance.address} refused: {e}"
            self.model.add_event("action-failed", message, instance)
            raise ActionError(502, message) from e
        except Exception as e:
            message = f"{action} of {instance.name} {instance.address} via {via} failed: {e}"
            self.model.add_event("action-failed", message, instance)
            raise ActionError(502, message) from e
        by = f" by {who}" if who else ""
        self.model.add_event(
            "action", f"{action} of {{service}} {{address}} via {via}{by}", instance, action=action
        )
        return {"ok": True, "action": action, "uuid": uuid, "via": via, "result": result}


__all__ = ["ACTIONS", "ActionError", "InstanceActions"]
