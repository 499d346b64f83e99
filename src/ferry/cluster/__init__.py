"""Scale-out on Ray Serve: N replicas of ferry's engine behind ferry's own OpenAI app.

    HTTP -> Ray Serve proxy -> FerryIngress (ferry's FastAPI app; engine = RemoteEngine)
                                   | DeploymentHandle.generate(token ids, params, id), streamed
                                   v   (PrefixAwareRouter picks the replica)
                               FerryReplica x N (one AsyncEngine each)  --stats-->  StatsHub

Only this package (and the cli that dispatches to it) imports ``ray``.
"""
