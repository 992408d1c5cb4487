"""gorb's REST API (``gorb-api``): a stateless bottle app on gevent that turns each HTTP request
into one request to ipvs-writer and each reply into an HTTP response (GORB's routes, ``:4672``).

    main.py           the process: config, the WSGI server, signals
    app.py            the routes, the error choke point, the body limit, the access log
    writer_client.py  one zmq.green DEALER shared by every greenlet, replies matched by id
    views.py          pure: GORB-style body decoding and the GET response shapes
    metrics.py        ``/metrics``: the writer's rows rendered in the background, kept for a ttl
    exposition.py     the text format written straight from the rows (pure)
    openapi.py        ``/openapi.json``: the OpenAPI 3.1 document of every route
    resolver.py       host names -> IP literals (gevent's resolver), with Go's error texts
"""
