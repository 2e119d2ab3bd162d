"""The ScaiGrid platform core of the controller.

Where things are (each domain package has the same inner shape: ``models``, ``service``,
``dependencies``, ``router``):

* :mod:`~scaigrid.platform.app` — ``create_app(settings)``, the lifespan, module mounting.
* :mod:`~scaigrid.platform.db` — ``Base``, ``UTCDateTime``, ``utcnow``, ``Database``,
  ``get_session``.
* :mod:`~scaigrid.platform.migrate` — ``migrate(settings)`` and the Alembic set-up.
* :mod:`~scaigrid.platform.envelope` — ``ok``, ``ok_list``, ``error_response``.
* :mod:`~scaigrid.platform.handlers` / :mod:`~scaigrid.platform.middleware` — errors into
  envelopes, request ids, body limits (``streaming_body``), HTTP metrics.
* :mod:`~scaigrid.platform.auth` — ``Principal``, ``current_principal``, ``require``.
* :mod:`~scaigrid.platform.permissions` — built-in roles and their permission keys.
* :mod:`~scaigrid.platform.tenancy` — partners, tenants, users.
* :mod:`~scaigrid.platform.modules` — module loading and the module catalogue.
* :mod:`~scaigrid.platform.bootstrap`, :mod:`~scaigrid.platform.cli` — first start, ``scaigrid``.
"""
