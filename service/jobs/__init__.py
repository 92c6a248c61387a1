"""Training jobs: the Celery app (torch-free, tasks sent by name), job state in Redis, the `jobs` CLI."""
