"""The ``gorb`` command: renders supervisord's config and runs the supervised system (launcher)."""
