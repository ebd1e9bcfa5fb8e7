"""The test kit every suite (and bench/) shares: the test world (world), polling instead of sleeps (polling), real
receivers and the registry writer (receivers), the FHIR server double (fhir_double), `cpis-bridge serve` as a
subprocess (service), delivery and Flag sync set-ups (delivery, sync), primaries, replicas and
Sentinels on loopback (redis_ha) and in-memory fakes of the core ports (fakes)."""
