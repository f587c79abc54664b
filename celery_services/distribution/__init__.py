"""The distribution: an app's services exposed as Celery tasks, and other apps' services as local proxies.

- :mod:`.distribution`: ``distribute`` / ``finalize`` and the :class:`Distribution` owning the parts below;
- :mod:`.settings` (the model) and :mod:`.config` (where its values come from);
- :mod:`.protocol`: task names, envelope, headers, replies — the contract both sides read;
- :mod:`.caller`: the caller's half of a call (``Transport``, ``RemoteService``);
- :mod:`.provider`: the provider's half (one Celery task per exposed method);
- :mod:`.lease`: leases on calls in flight and redelivery of the lapsed ones;
- :mod:`.manifest`, :mod:`.registry`, :mod:`.discovery`: who offers what, and the proxies that follow;
- :mod:`.events`, :mod:`.event_publisher`, :mod:`.event_consumer`, :mod:`.event_epoch`: the event bus;
- :mod:`.celery_app`: the Celery app calls travel with; :mod:`.worker`: what happens inside a worker;
- :mod:`.bootsteps`, :mod:`.redis_transport`: what the workers and kombu get from us;
- :mod:`.logs`: call fields on log lines.
"""

from .celery_app import make_celery
from .distribution import Distribution, distribute, finalize

__all__ = ["Distribution", "distribute", "finalize", "make_celery"]
