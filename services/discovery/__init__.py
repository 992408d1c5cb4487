"""discovery: mirrors the writer's services into Consul and keeps a shared configuration store
(Consul KV, or a read-only directory) in sync with the writer. Modules, pure core first:

    registry        what the agent should hold: registrations, check status (pure)
    documents       the store's layout and documents, parsed key by key (pure)
    reconcile       the three-way store <-> writer diff and the safety rule (pure)
    blocking        the blocking-query index rule and the retry backoff (pure)
    consul_adapter  the only importer of ``consul`` (py-consul)
    stores          Consul KV and directory stores: read, watch, write back with CAS
    registrar       the registration loop          syncer   the store sync loop
    control         the control socket (gorb.common.store_messages) for the API
    service         which loops run, from [discovery]   main / __main__   the program
"""
