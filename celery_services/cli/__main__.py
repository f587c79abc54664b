"""``python -m celery_services.cli``: the ``celery-services`` command."""

from . import main

main()
