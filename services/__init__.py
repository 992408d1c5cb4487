"""The gorb processes, one package each: ipvs_writer (and, later, api, pulse_worker, discovery)."""
