"""The middle floor: Subscription bootstrap, receiver logic, the job queue, the worker pipeline
and reconciliation. Reads no Settings; reaches the models and stores through Protocols and the
FHIR server through the ground floor's client and builders."""
