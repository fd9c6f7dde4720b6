"""PostgreSQL + pgvector: embedded server, schema, upsert, k-NN search. Knows nothing of torch."""
