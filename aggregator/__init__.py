"""The Flower aggregator: ServerApp, strategy, model registry and deployment.

Nothing is public yet; see the open issue for federated training rounds.
"""

__all__: list[str] = []
