"""The federated round without Flower: ``protocol`` (the messages), ``runconfig`` (the run's
settings), ``node`` (a client's work), ``aggregator`` (the server's merge and masks),
``downlink`` (G as changes), ``checkpoint``, ``precheck``, ``report`` (one run's summary),
``export``, ``launch`` (driving ``flwr run``), ``reaper`` and ``console`` (process hygiene
and quiet logs)."""
