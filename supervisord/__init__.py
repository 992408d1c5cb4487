"""Package data only: ``supervisord.conf.in``, the template ``gorb run`` renders (read with
``importlib.resources`` by ``gorb.services.launcher.conf``). This folder is ``gorb.supervisord``."""
