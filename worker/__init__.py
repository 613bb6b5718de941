"""Celery worker: tasks, job life cycle, pipelines over models/, and the embedded service."""
