"""The example services, free of side effects so tests and other apps can import them."""

from __future__ import annotations

import logging
from typing import Any

from celery_services import Forbidden, HookContext, MemoryService, ServiceWrapper

log = logging.getLogger("workers")


class Articles(MemoryService):
    """Articles, with the custom method ``publish_article`` emitting ``article_published``."""

    def publish_article(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """Mark the article ``data["id"]`` published and announce it."""
        article = self.patch(data["id"], {"published": True}, params)
        self.emit("article_published", article)
        return article


#: What each role may do with the articles: the gateway's permission table (a role absent here: nothing).
ABILITIES: dict[str, frozenset[str]] = {
    "reader": frozenset({"find", "get"}),
    "editor": frozenset({"find", "get", "create", "update", "patch", "remove", "publish_article"}),
}


def decorate(service: ServiceWrapper) -> None:
    """Make a remote service of ``my-app`` look like one of ours (the KDK's decorateDistributedService).

    The gateway's ``service`` listener: the place to register permissions for the service. Its hooks run
    in the gateway, before a call travels, so they judge the gateway's user as they would on a local
    service; its publish filter sends each article's events to its owner only.
    """
    if getattr(service, "remote", False) and service.key == "my-app":
        guard(service)
        log.info("remote service %s decorated: permissions registered", service.path)


def guard(service: ServiceWrapper) -> ServiceWrapper:
    """The permissions of the articles: :data:`ABILITIES` by the user's ``role``, each article owned by
    its creator (``sub``), and its events published to its owner only."""
    service.hooks({"before": {"all": [_check_abilities], "create": [_stamp_owner]}})
    return service.publish(_owner_sees)


def _check_abilities(context: HookContext) -> None:
    user = context.params.get("user")
    if user is None:
        return  # an internal call, or a gateway serving anonymous clients (its own choice)
    role = user.get("role") if isinstance(user, dict) else None
    if context.method not in ABILITIES.get(str(role), frozenset()):
        raise Forbidden(f"Role '{role}' may not {context.method} {context.path}", {"method": context.method})


def _stamp_owner(context: HookContext) -> None:
    user = context.params.get("user")
    if isinstance(user, dict) and isinstance(context.data, dict):
        context.data = {**context.data, "owner": user.get("sub")}


def _owner_sees(event: str, data: Any, context: Any, user: Any) -> bool:
    if user is None:
        return True  # an anonymous gateway (with authentication on, anonymous clients never connect)
    owner = data.get("owner") if isinstance(data, dict) else None
    return owner is None or owner == user.get("sub")
