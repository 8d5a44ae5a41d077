"""Live rollout changes: a new user_config for a running application's Ingress deployment, through Serve.

`apply_ingress_config` is what POST /admin/rollout calls. An application deployed from a config (`serve
deploy`, a RayService) gets its config applied again with only the Ingress's user_config changed: exactly
what `serve deploy` of the edited file does, so `serve config`/`serve status` show the new weights. One
deployed by `serve.run` (`distcls serve`) gets its own deployments again with the same code versions and only
that user_config changed. Either way Serve calls `reconfigure` on the running Ingress replicas: nothing is
restarted and no request fails. `check_deployments_healthy` refuses a change that would send traffic to a
variant whose deployment is not healthy (the traffic stays where it is).
"""

from __future__ import annotations

INGRESS = "Ingress"
HEALTHY = ("HEALTHY", "UPSCALING", "DOWNSCALING")


async def controller():
    import asyncio

    from ray.serve.context import _get_global_client

    return (await asyncio.to_thread(_get_global_client))._controller


async def app_details(app_name: str) -> dict:
    details = await (await controller()).get_serve_instance_details.remote()
    return details["applications"][app_name]


async def check_deployments_healthy(app_name: str, deployments: list[str]) -> None:
    """Raise ValueError naming the first of `deployments` that is not healthy in the application."""
    status = {name: d["status"] for name, d in (await app_details(app_name))["deployments"].items()}
    for name in deployments:
        if status.get(name) not in HEALTHY:
            raise ValueError(f"deployment {name} is {status.get(name, 'missing')}, not healthy; the traffic stays as it is")


async def apply_ingress_config(app_name: str, user_config: dict) -> str:
    """Give the application's Ingress this user_config through Serve's controller; -> how ("declarative" or
    "imperative", after how the application was deployed)."""
    ctl = await controller()
    source = (await app_details(app_name)).get("source")
    if str(getattr(source, "value", source)).lower() == "declarative":
        await apply_declarative(ctl, app_name, user_config)
        return "declarative"
    await redeploy_imperative(ctl, app_name, user_config)
    return "imperative"


async def apply_declarative(ctl, app_name: str, user_config: dict) -> None:
    """The controller's current config with the Ingress's user_config replaced, applied as `serve deploy` does."""
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    configs = await ctl.get_app_configs.remote()
    apps = []
    for name, app in configs.items():
        if name == app_name:
            doc = app.model_dump(exclude_unset=True)
            deployments = [d for d in doc.get("deployments", []) if d.get("name") != INGRESS]
            ingress = next((d for d in doc.get("deployments", []) if d.get("name") == INGRESS), {"name": INGRESS})
            doc["deployments"] = [*deployments, {**ingress, "user_config": user_config}]
            app = ServeApplicationSchema.model_validate(doc)
        apps.append(app)
    details = await ctl.get_serve_instance_details.remote()
    await ctl.apply_config.remote(ServeDeploySchema(applications=apps, target_capacity=details.get("target_capacity")))


async def redeploy_imperative(ctl, app_name: str, user_config: dict) -> None:
    """The application's deployments as they are deployed (same code versions, same settings), the Ingress's
    user_config replaced: Serve reconfigures the Ingress replicas and leaves the others alone."""
    from ray.serve.generated.serve_pb2 import ApplicationArgs, DeploymentArgs

    deployed = await ctl.list_deployments_internal.remote()
    args = []
    for dep_id, (info, route_prefix) in deployed.items():
        if dep_id.app_name != app_name:
            continue
        config = info.deployment_config
        if dep_id.name == INGRESS:
            config = config.model_copy(update={"user_config": user_config})
        proto = DeploymentArgs(
            deployment_name=dep_id.name,
            deployment_config=config.to_proto_bytes(),
            replica_config=info.replica_config.to_proto_bytes(),
            deployer_job_id=str(info.deployer_job_id),
            ingress=info.ingress,
        )
        if info.ingress and (route_prefix or info.route_prefix):
            proto.route_prefix = route_prefix or info.route_prefix
        args.append(proto.SerializeToString())
    if not any(dep_id.app_name == app_name and dep_id.name == INGRESS for dep_id in deployed):
        raise ValueError(f"application {app_name!r} has no {INGRESS} deployment")
    await ctl.deploy_applications.remote({app_name: args}, {app_name: ApplicationArgs().SerializeToString()})
