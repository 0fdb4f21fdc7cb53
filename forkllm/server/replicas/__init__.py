"""Many engine replicas behind one OpenAI endpoint, on Ray (`forkllm serve --replicas N`):
`actor.py` (one AsyncEngine per Ray actor), `router.py` (prefix-, load- or turn-based routing,
pure Python), `client.py` (the server's EngineClient over the actors), `callbacks.py` (a
streamed policy's callbacks kept on the front end, their calls streamed back from the actor)."""
