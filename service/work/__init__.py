"""Work: the background tasks of the service (jobs, batch shards, inductions, trainings) and the job policy."""
