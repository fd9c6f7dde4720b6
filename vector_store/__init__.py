"""PostgreSQL + pgvector: the embedded server, schema, upsert and k-NN search. Knows nothing of torch."""
