"""Checks deploy/: every kustomize overlay renders (kubectl's built-in kustomize), every rendered
object validates against the Kubernetes 1.30 OpenAPI schemas (kubernetes-validate, strict), the
manifests agree with the binaries (every flag they pass is accepted by the binary's argument
parser; the ports of arguments, containers, probes, Services and NetworkPolicies line up), and
every path the Dockerfile copies from the repository exists.

Run by `make test` with the .venv's Python: python deploy/tests/check_manifests.py
"""

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile

import kubernetes_validate
import yaml

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
OVERLAYS = ["gpu", "cpu"]
KUBERNETES = "1.30.0"
PASSED, FAILED = [], []


def check(name, ok, detail=""):
    (PASSED if ok else FAILED).append(name)
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail and not ok else ''}")


def render(overlay, tree):
    output = subprocess.run(["kubectl", "kustomize", os.path.join(tree, "overlays", overlay)], capture_output=True, text=True)
    check(f"{overlay}: kubectl kustomize renders", output.returncode == 0, output.stderr.strip())
    return [doc for doc in yaml.safe_load_all(output.stdout) if doc] if output.returncode == 0 else []


def containers(doc):
    spec = doc.get("spec", {})
    template = spec.get("jobTemplate", {}).get("spec", spec).get("template", {})
    return template.get("spec", {}).get("containers", [])


def expand(arg, env):
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def container_env(container, settings):
    env = dict(settings)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[item["name"]] = "10.0.0.7"
        else:
            env[item["name"]] = "pod-0"
    return env


def flag(args, name):
    for arg in args:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def check_overlay(overlay, docs):
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
            check(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} validates against {KUBERNETES}", True)
        except Exception as error:  # noqa: BLE001 - report every kind of validation failure
            check(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} validates against {KUBERNETES}", False, str(error)[:500])

    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    settings = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("cohort-settings"))["data"]
    binaries = {}
    for doc in docs:
        for container in containers(doc):
            command = container.get("command")
            check(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} names its binary", bool(command), "no command: the image has no ENTRYPOINT")
            if not command:
                continue
            binary = os.path.join(ROOT, "target", "release", command[0])
            env = container_env(container, settings)
            args = [expand(a, env) for a in container.get("args", [])]
            unexpanded = [a for a in args if "$(" in a]
            check(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} arguments all expand", not unexpanded, str(unexpanded))
            run = subprocess.run([binary, *args, "--help"], capture_output=True, text=True)
            check(f"{overlay}: {command[0]} accepts {' '.join(args)}", run.returncode == 0, run.stderr.strip()[:300])
            binaries[doc["kind"], doc["metadata"]["name"]] = (container, args)

    # The coordinator listens where its container port, probes, Service and policy say.
    container, args = binaries["StatefulSet", "coordinator"]
    listen = int(flag(args, "listen").rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    check(f"{overlay}: coordinator container port is its --listen port", ports.get("grpc") == listen)
    for probe in ("readinessProbe", "livenessProbe"):
        check(f"{overlay}: coordinator {probe} probes grpc health on {listen}", container[probe]["grpc"]["port"] == listen)
    service = by_kind["Service", "coordinator"]["spec"]["ports"][0]
    check(f"{overlay}: the coordinator Service targets the grpc port", service["targetPort"] in ("grpc", listen))
    policy = by_kind["NetworkPolicy", "coordinator-ingress"]["spec"]["ingress"][0]["ports"][0]["port"]
    check(f"{overlay}: the coordinator NetworkPolicy opens {listen}", policy == listen)

    # Workers reach the coordinator through the Service and open the collective port to peers.
    container, args = binaries["Deployment", "worker"]
    url = flag(args, "coordinator")
    check(f"{overlay}: workers dial the coordinator Service", url == f"http://coordinator:{service['port']}", url)
    collective = int(flag(args, "collective-port"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    check(f"{overlay}: worker container port is its --collective-port", ports.get("collective") == collective)
    policy = by_kind["NetworkPolicy", "worker-ingress"]["spec"]["ingress"][0]["ports"][0]["port"]
    check(f"{overlay}: the worker NetworkPolicy opens {collective} to workers", policy == collective)
    check(f"{overlay}: workers advertise their pod address", flag(args, "advertise-host") == "10.0.0.7")
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    check(f"{overlay}: GPU requests match the overlay", (gpus == 1) == (overlay == "gpu"), str(gpus))


def check_dockerfile():
    path = os.path.join(ROOT, "deploy", "docker", "Dockerfile")
    for line in open(path):
        words = line.split()
        if not words or words[0] != "COPY" or any(w.startswith("--from") for w in words):
            continue
        for source in words[1:-1]:
            check(f"Dockerfile copies {source}, which exists", os.path.exists(os.path.join(ROOT, source)))
    check("a .dockerignore keeps build outputs out of the context", os.path.exists(os.path.join(ROOT, ".dockerignore")))


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "k8s")
        shutil.copytree(os.path.join(ROOT, "deploy", "k8s"), tree)
        for name in ("client", "worker"):
            token = os.path.join(tree, "base", "secrets", f"{name}.token")
            if not os.path.exists(token):
                with open(token, "w") as out:
                    out.write(secrets.token_hex(32) + "\n")
        for overlay in OVERLAYS:
            check_overlay(overlay, render(overlay, tree))
    check_dockerfile()
    print(f"manifests: {len(PASSED)} passed, {len(FAILED)} failed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
