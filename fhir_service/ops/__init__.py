"""Operations: the embedded servers (HAPI, PostgreSQL) and our own processes, started, stopped
and probed for the CLI, the demo, the tests and the benchmarks."""
