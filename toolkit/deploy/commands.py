"""`runyard deploy kubernetes [status|destroy]` and `runyard deploy aws preview|up|outputs|destroy`: parse,
call toolkit/deploy, print. Heavy imports (the kubernetes client, Pulumi) wait until a command runs."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from toolkit.console import JsonOpt, YesOpt, confirm, err, fail, out, print_json, run

deploy_app = typer.Typer(help="Deploy runyard: Kubernetes manifests, upgrades and rollouts; AWS "
                         "infrastructure.", no_args_is_help=True)

ConfigOpt = Annotated[str | None, typer.Option(
    "--config", help="runyard.yaml: settings under `kubernetes:` / `aws:`; flags win.", show_default=False)]
KubeconfigOpt = Annotated[str | None, typer.Option(
    "--kubeconfig", help="Kubeconfig file (default: KUBECONFIG, ~/.kube/config, else in-cluster).",
    show_default=False)]
ContextOpt = Annotated[str | None, typer.Option("--context", help="Kubeconfig context.", show_default=False)]
NameOpt = Annotated[str | None, typer.Option("--name", help="The deployment's name.", show_default=False)]
NamespaceOpt = Annotated[str | None, typer.Option("--namespace", "-n", help="Kubernetes namespace.",
                                                  show_default=False)]
kubernetes_app = typer.Typer(help="Deploy to Kubernetes (without a verb), or show or remove a deployment.")
deploy_app.add_typer(kubernetes_app, name="kubernetes")
aws_app = typer.Typer(help="AWS for runyard through Pulumi: KMS key, S3 bucket, RDS PostgreSQL, IAM role.",
                      no_args_is_help=True)
deploy_app.add_typer(aws_app, name="aws")


def _key_values(pairs: list[str] | None, flag: str) -> dict[str, str] | None:
    if not pairs:
        return None
    values = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            fail(f"{flag}: {pair!r} is not KEY=VALUE", "INVALID_PARAMETER_VALUE", exit_code=2)
        values[key] = value
    return values


@kubernetes_app.callback(invoke_without_command=True)
def deploy_kubernetes(
    ctx: typer.Context,
    name: NameOpt = None,
    namespace: NamespaceOpt = None,
    image: Annotated[str | None, typer.Option(
        "--image", help="The runyard image, pinned (…:1.4.2 or …@sha256:…).", show_default=False)] = None,
    replicas: Annotated[int | None, typer.Option("--replicas", min=1, show_default=False,
                                                 help="Server pods (default 2).")] = None,
    backend_store_uri_secret: Annotated[str | None, typer.Option(
        "--backend-store-uri-secret", help="SECRET/KEY holding the database URI.",
        show_default=False)] = None,
    backend_store_uri: Annotated[str | None, typer.Option(
        "--backend-store-uri", help="A database URI without a password (or sqlite:////data/…).",
        show_default=False)] = None,
    backend_store_password_secret: Annotated[str | None, typer.Option(
        "--backend-store-password-secret", help="SECRET/KEY holding the database password (a mounted file, "
        "rotatable without a restart).", show_default=False)] = None,
    artifacts_destination: Annotated[str | None, typer.Option(
        "--artifacts-destination", help="s3://, gs://, wasbs://, hdfs://, ftp://, sftp:// or /data/….",
        show_default=False)] = None,
    auth: Annotated[str | None, typer.Option(
        "--auth", help="basic, token or basic+token (default).", show_default=False)] = None,
    htpasswd_secret: Annotated[str | None, typer.Option(
        "--htpasswd-secret", help="SECRET/KEY of the htpasswd file (basic auth).",
        show_default=False)] = None,
    token_pepper_secret: Annotated[str | None, typer.Option(
        "--token-pepper-secret", help="SECRET/KEY of the tokens' pepper.", show_default=False)] = None,
    tls_secret: Annotated[str | None, typer.Option(
        "--tls-secret", help="kubernetes.io/tls Secret: NGINX in the pod terminates TLS.",
        show_default=False)] = None,
    ingress_host: Annotated[str | None, typer.Option(
        "--ingress-host", help="Create an Ingress for this host.", show_default=False)] = None,
    env_secret: Annotated[str | None, typer.Option(
        "--env-secret", help="A Secret whose keys become the server's environment (store credentials).",
        show_default=False)] = None,
    service_account_annotation: Annotated[list[str] | None, typer.Option(
        "--service-account-annotation", help="KEY=VALUE on the ServiceAccount, e.g. "
        "eks.amazonaws.com/role-arn=… (IRSA); repeatable.", show_default=False)] = None,
    create_namespace: Annotated[bool, typer.Option(
        "--create-namespace", help="Create the namespace (labelled for the restricted Pod Security "
        "Standard).")] = False,
    config: ConfigOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the manifests as YAML (for GitOps) and touch no cluster.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="Seconds for each wait: the upgrade Job, "
                                           "the rollout.")] = 600.0,
    as_json: JsonOpt = False,
) -> None:
    """Deploy or upgrade: preflight, apply, schema upgrade Job, rollout, /ready. Nothing is written when a
    setting or a referenced Secret is wrong; a failed upgrade leaves the running version serving."""
    if ctx.invoked_subcommand is not None:
        return
    from toolkit.deploy import kubernetes
    from toolkit.deploy.config import load_kubernetes_settings

    flags = {"name": name, "namespace": namespace, "image": image, "replicas": replicas,
             "backend_store_uri_secret": backend_store_uri_secret, "backend_store_uri": backend_store_uri,
             "backend_store_password_secret": backend_store_password_secret,
             "artifacts_destination": artifacts_destination, "auth": auth, "htpasswd_secret": htpasswd_secret,
             "token_pepper_secret": token_pepper_secret, "tls_secret": tls_secret,
             "ingress.host": ingress_host, "env_secret": env_secret,
             "service_account_annotations": _key_values(service_account_annotation,
                                                        "--service-account-annotation"),
             "create_namespace": create_namespace or None}
    settings = run(load_kubernetes_settings, flags, config, as_json=as_json)
    if dry_run:
        sys.stdout.write(run(kubernetes.render, settings, as_json=as_json))
        return
    client = run(kubernetes.api_client, kubeconfig, context, as_json=as_json)
    report = run(kubernetes.deploy, settings, client, timeout_s=timeout, as_json=as_json,
                  on_step=lambda line: err.print(line, markup=False, highlight=False))
    if as_json:
        return print_json(report)
    upgrade = report["upgrade_job"]
    schema = ("schema unchanged" if upgrade is None else
              f"schema checked by {upgrade['name']}" if not upgrade["ran"] else
              f"schema upgraded by {upgrade['name']} in {upgrade['seconds']:.0f} s")
    was = f" (was {report['previous_image']})" if report["previous_image"] else " (first install)"
    out.print(f"Deployed {report['namespace']}/{report['name']}: {report['image']}{was}; {schema}; "
              f"rolled out in {report['rollout_seconds']:.0f} s; /ready {report['ready']['status']}.",
              markup=False)


@kubernetes_app.command("status")
def deploy_kubernetes_status(name: NameOpt = None, namespace: NamespaceOpt = None,
                             kubeconfig: KubeconfigOpt = None, context: ContextOpt = None,
                             as_json: JsonOpt = False) -> None:
    """The Deployment's rollout, the last upgrade Job and /ready; exit 0 when all is well, else 1."""
    from toolkit.deploy import kubernetes

    if not name or not namespace:
        fail("--name and --namespace are required.", "INVALID_PARAMETER_VALUE", as_json, exit_code=2)
    client = run(kubernetes.api_client, kubeconfig, context, as_json=as_json)
    report = run(kubernetes.status, name, namespace, client, as_json=as_json)
    deployment, job, ready = report["deployment"], report["upgrade_job"], report["ready"]
    healthy = bool(deployment["rolled_out"] and ready.get("ok"))
    if as_json:
        print_json(report | {"ok": healthy})
    else:
        out.print(f"deployment  {deployment['image']}: {deployment['ready']}/{deployment['replicas']} ready, "
                  f"{deployment['updated']} updated{'' if deployment['rolled_out'] else ' (rolling out)'}",
                  markup=False)
        if job:
            out.print(f"upgrade     {job.get('name', '')} {job.get('state') or job.get('error')}",
                      markup=False)
        checks = ", ".join(f"{check}: {'ok' if result.get('ok') else result.get('error', 'failed')}"
                           for check, result in (ready.get("checks") or {}).items())
        shown = ready.get("status") or ready.get("error")
        out.print(f"ready       {shown}" + (f" ({checks})" if checks else ""), markup=False)
    raise typer.Exit(0 if healthy else 1)


@kubernetes_app.command("destroy")
def deploy_kubernetes_destroy(
    name: NameOpt = None, namespace: NamespaceOpt = None,
    delete_volumes: Annotated[bool, typer.Option(
        "--delete-volumes", help="Also delete the data and backup volumes (SQLite, local artifacts, "
        "backups). Secrets are never deleted.")] = False,
    kubeconfig: KubeconfigOpt = None, context: ContextOpt = None, yes: YesOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove a deployment's objects; volumes are kept unless --delete-volumes."""
    from toolkit.deploy import kubernetes

    if not name or not namespace:
        fail("--name and --namespace are required.", "INVALID_PARAMETER_VALUE", as_json, exit_code=2)
    volumes = " and its volumes" if delete_volumes else ""
    confirm(f"Delete the runyard deployment {namespace}/{name}{volumes}?", yes, as_json)
    client = run(kubernetes.api_client, kubeconfig, context, as_json=as_json)
    report = run(kubernetes.destroy, name, namespace, client, delete_volumes=delete_volumes, as_json=as_json)
    if as_json:
        return print_json(report)
    for deleted in report["deleted"]:
        out.print(f"deleted  {deleted}", markup=False)
    for kept in report["kept"]:
        out.print(f"kept     {kept} (--delete-volumes removes it)", markup=False)


AwsStackOpt = Annotated[str | None, typer.Option(
    "--stack", help="Pulumi stack (default: the name).", show_default=False)]
AwsBackendOpt = Annotated[str | None, typer.Option(
    "--backend-url", help="Where Pulumi keeps state, e.g. s3://bucket (default: the CLI's login).",
    show_default=False)]
AwsSecretsOpt = Annotated[str | None, typer.Option(
    "--secrets-provider", help="Pulumi secrets provider, e.g. awskms://alias/pulumi.", show_default=False)]
RegionOpt = Annotated[str | None, typer.Option("--region", help="AWS region.", show_default=False)]
VpcOpt = Annotated[str | None, typer.Option("--vpc-id", help="The VPC the database goes into.",
                                            show_default=False)]
SubnetOpt = Annotated[list[str] | None, typer.Option(
    "--subnet", help="A private subnet for the database (two or more, in different zones).",
    show_default=False)]


def _aws_call(action: str, config: str | None, name: str | None, region: str | None, vpc_id: str | None,
              subnets: list[str] | None, stack: str | None, backend_url: str | None,
              secrets_provider: str | None, as_json: bool):
    from toolkit.deploy import aws
    from toolkit.deploy.config import load_aws_settings

    flags = {"name": name, "region": region, "vpc_id": vpc_id,
             "private_subnet_ids": tuple(subnets) if subnets else None}
    settings = run(load_aws_settings, flags, config, as_json=as_json)
    stream = None if as_json else (lambda line: err.print(line.rstrip(), markup=False, highlight=False))
    options = {"stack": stack, "backend_url": backend_url, "secrets_provider": secrets_provider}
    if action != "outputs":
        options["on_output"] = stream
    return run(getattr(aws, action), settings, as_json=as_json, **options)


def _print_aws_outputs(outputs: dict, as_json: bool) -> None:
    from toolkit.deploy import aws

    handover = run(aws.kubernetes_flags, outputs, as_json=as_json)
    if as_json:
        return print_json({"outputs": outputs, "kubernetes": handover})
    for key, value in sorted(outputs.items()):
        out.print(f"{key:28} {value}", markup=False)
    annotations = " ".join(f"--service-account-annotation {key}={value}"
                           for key, value in handover["service_account_annotations"].items())
    out.print("\nNext: runyard deploy kubernetes --backend-store-uri "
              f"'{handover['backend_store_uri']}' "
              f"--artifacts-destination {handover['artifacts_destination']} "
              f"{annotations} --backend-store-password-secret SECRET/KEY …", markup=False)
    out.print(handover["note"], markup=False)


@aws_app.command("preview")
def deploy_aws_preview(config: ConfigOpt = None, name: NameOpt = None, region: RegionOpt = None,
                       vpc_id: VpcOpt = None, subnet: SubnetOpt = None, stack: AwsStackOpt = None,
                       backend_url: AwsBackendOpt = None, secrets_provider: AwsSecretsOpt = None,
                       as_json: JsonOpt = False) -> None:
    """Show what `up` would create, change or delete."""
    changes = _aws_call("preview", config, name, region, vpc_id, subnet, stack, backend_url, secrets_provider,
                        as_json)
    if as_json:
        return print_json({"changes": changes})
    out.print(", ".join(f"{count} to {op}" for op, count in changes.items()) or "no changes", markup=False)


@aws_app.command("up")
def deploy_aws_up(config: ConfigOpt = None, name: NameOpt = None, region: RegionOpt = None,
                  vpc_id: VpcOpt = None, subnet: SubnetOpt = None, stack: AwsStackOpt = None,
                  backend_url: AwsBackendOpt = None, secrets_provider: AwsSecretsOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Create or update the bucket, database, key, secret and role; print what `deploy kubernetes` needs."""
    outputs = _aws_call("up", config, name, region, vpc_id, subnet, stack, backend_url, secrets_provider,
                        as_json)
    _print_aws_outputs(outputs, as_json)


@aws_app.command("outputs")
def deploy_aws_outputs(config: ConfigOpt = None, name: NameOpt = None, region: RegionOpt = None,
                       vpc_id: VpcOpt = None, subnet: SubnetOpt = None, stack: AwsStackOpt = None,
                       backend_url: AwsBackendOpt = None, secrets_provider: AwsSecretsOpt = None,
                       as_json: JsonOpt = False) -> None:
    """The stack's outputs and the `runyard deploy kubernetes` settings they give."""
    outputs = _aws_call("outputs", config, name, region, vpc_id, subnet, stack, backend_url, secrets_provider,
                        as_json)
    _print_aws_outputs(outputs, as_json)


@aws_app.command("destroy")
def deploy_aws_destroy(config: ConfigOpt = None, name: NameOpt = None, region: RegionOpt = None,
                       vpc_id: VpcOpt = None, subnet: SubnetOpt = None, stack: AwsStackOpt = None,
                       backend_url: AwsBackendOpt = None, secrets_provider: AwsSecretsOpt = None,
                       yes: YesOpt = False, as_json: JsonOpt = False) -> None:
    """Delete the stack's resources. The database's deletion protection stops it until turned off; a final
    snapshot is kept."""
    confirm("Delete the AWS resources of this runyard stack?", yes, as_json)
    changes = _aws_call("destroy", config, name, region, vpc_id, subnet, stack, backend_url, secrets_provider,
                        as_json)
    if as_json:
        return print_json({"changes": changes})
    out.print(", ".join(f"{count} {op}" for op, count in changes.items()) or "nothing to delete",
              markup=False)
