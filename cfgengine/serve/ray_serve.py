"""The same app as a Ray Serve deployment (scale-out beyond one machine: one replica per device,
Ray's router in front); needs the `ray` extra (pip install 'cfgengine[ray]').

    serve run cfgengine.serve.ray_serve:app_builder ckpt=default num_gpus=1 num_replicas=2

Each replica builds its own app (and loads the model) in its own process, so each keeps its own
running batch and its own /metrics; Ray spreads requests over replicas and replaces one that
dies (tests/test_serve_ray.py kills one).
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


# `serve run` passes every argument as a string: the type each of create_app's settings needs
SETTINGS = {"device": str, "backend": str, "api_key": str, "max_rows": int, "max_queue": int,
            "max_steps": int, "max_body_bytes": int, "deadline_s": float}


def app_builder(args: dict):
    """`serve run cfgengine.serve.ray_serve:app_builder ckpt=… num_gpus=… num_replicas=…`;
    the other keys (SETTINGS) go to `create_app`."""
    args = dict(args)
    model = args.pop("ckpt", "default")
    replicas = int(args.pop("num_replicas", 1))
    gpus = float(args.pop("num_gpus", 0))
    unknown = sorted(set(args) - set(SETTINGS))
    if unknown:  # here, before Ray starts replicas that would each fail on it
        raise ValueError(f"unknown argument {unknown[0]!r}; known: ckpt, num_replicas, "
                         f"num_gpus, {', '.join(SETTINGS)}")
    settings = {key: SETTINGS[key](value) for key, value in args.items()}
    return deployment(model, num_replicas=replicas, num_gpus=gpus, **settings).bind()
