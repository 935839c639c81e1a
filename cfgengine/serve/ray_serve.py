"""The same app as a Ray Serve deployment (scale-out beyond one machine: one replica per device,
Ray's router in front). Ray is not a dependency of cfgengine: install `ray[serve]` to use this.

    serve run cfgengine.serve.ray_serve:app_builder ckpt=default num_gpus=1 num_replicas=2

Each replica builds its own app (and loads the model) in its own process, so each keeps its own
running batch; Ray spreads requests over replicas.
"""
from __future__ import annotations

from cfgengine.serve.app import create_app


def deployment(model="default", *, num_replicas: int = 1, num_gpus: float = 0, **settings):
    """A Ray Serve deployment of `create_app(model, **settings)`, built on each replica."""
    from ray import serve

    def build():
        return create_app(model, **settings)

    @serve.deployment(name="cfgengine", num_replicas=num_replicas,
                      ray_actor_options={"num_gpus": num_gpus})
    @serve.ingress(build)
    class CfgengineServe:
        """One replica: one device, one running batch."""

    return CfgengineServe


def app_builder(args: dict):
    """`serve run cfgengine.serve.ray_serve:app_builder ckpt=… num_gpus=… num_replicas=…`;
    other keys (max_rows, max_queue, device, backend) go to `create_app`."""
    args = dict(args)
    model = args.pop("ckpt", "default")
    replicas = int(args.pop("num_replicas", 1))
    gpus = float(args.pop("num_gpus", 0))
    for key in ("max_rows", "max_queue", "max_steps"):
        if key in args:
            args[key] = int(args[key])
    return deployment(model, num_replicas=replicas, num_gpus=gpus, **args).bind()
