#!/usr/bin/env python3
"""Render the moe-serve Helm chart and validate every manifest.

Renders deploy/helm/moe-serve with Helm's own template engine (the Go SDK,
through helm-python-sdk; no cluster, no network) for the chart defaults and
each file in deploy/helm/ci-values/, lints the chart strictly, and validates
every rendered object against the Kubernetes OpenAPI schemas shipped by
kubernetes-validate (strict: unknown fields are errors) for the oldest and the
newest Kubernetes version the chart supports. It also checks what the chart
promises (probes, ports, scrape annotations, the API key from a Secret, the
placement plan path shared by planner and server) and that invalid settings
fail the render with a message.

Usage: validate_chart.py [OUT_DIR]   (rendered manifests are written there)
"""

import os
import sys
import tempfile

import helm_python as helm
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.join(HERE, "helm", "moe-serve")
CI_VALUES = os.path.join(HERE, "helm", "ci-values")
# the chart's kubeVersion floor and the newest schemas available
KUBE_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]
RELEASE = dict(name="moe-serve", namespace="inference", revision=3, is_install=True)

passed, failed = 0, 0


def check(what, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"FAIL {what}{': ' + detail if detail else ''}")


def render(values):
    chart = helm.Chart.load(CHART)
    return chart.render(values=values, **RELEASE)


def objects(manifests):
    """(template, object) for every non-empty YAML document rendered."""
    out = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append((template, doc))
    return out


def by_kind(objs, kind):
    return [o for _, o in objs if o["kind"] == kind]


def server_container(objs):
    (dep,) = by_kind(objs, "Deployment")
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "moe-serve"]
    return dep, c


def check_common(case, objs):
    dep, c = server_container(objs)
    check(f"{case}: readiness on /health", c["readinessProbe"].get("httpGet", {}).get("path") == "/health")
    check(f"{case}: liveness probe", "livenessProbe" in c)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    (svc,) = by_kind(objs, "Service")
    sports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    check(f"{case}: service exposes http and grpc", set(sports) == {"http", "grpc"} and sports == ports, str(sports))
    check(f"{case}: resources set", bool(c.get("resources", {}).get("requests")))
    sc = dep["spec"]["template"]["spec"]["securityContext"]
    check(f"{case}: runs as non-root", sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0)
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"] == dep["metadata"]["name"]]
    check(f"{case}: listens on all interfaces", cm["data"].get("MOE_HOST") == "0.0.0.0")
    check(
        f"{case}: config reaches the server",
        any(e.get("configMapRef", {}).get("name") == cm["metadata"]["name"] for e in c.get("envFrom", [])),
    )
    check(f"{case}: config values are strings", all(isinstance(v, str) for v in cm["data"].values()))


def check_case(case, values, objs):
    dep, c = server_container(objs)
    ann = dep["spec"]["template"]["metadata"].get("annotations", {})
    scrape = values.get("metrics", {}).get("scrape", True)
    check(f"{case}: prometheus annotations", (ann.get("prometheus.io/scrape") == "true") == scrape, str(ann))
    env = {e["name"]: e for e in c.get("env", [])}
    api = values.get("apiKey", {})
    if api.get("enabled"):
        ref = env.get("MOE_API_KEY", {}).get("valueFrom", {}).get("secretKeyRef", {})
        want = api.get("existingSecret") or "moe-serve-api-key"
        check(f"{case}: API key from Secret {want}", ref.get("name") == want, str(ref))
        secrets = by_kind(objs, "Secret")
        check(f"{case}: Secret created only when not existing", len(secrets) == (0 if api.get("existingSecret") else 1))
    else:
        check(f"{case}: no API key", "MOE_API_KEY" not in env and not by_kind(objs, "Secret"))
    model = values.get("model", {})
    if model.get("volume"):
        mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
        check(f"{case}: model volume mounted read-only", mounts.get("model", {}).get("readOnly") is True)
    placement = values.get("placement", {})
    if placement.get("enabled"):
        plan_arg = [a for a in c["args"] if a.startswith("--placement=")]
        check(f"{case}: server gets --placement", len(plan_arg) == 1, str(c["args"]))
        plan = plan_arg[0].split("=", 1)[1] if plan_arg else None
        if placement.get("mode") == "job":
            (job,) = by_kind(objs, "Job")
            planner = job["spec"]["template"]["spec"]["containers"][0]
            check(f"{case}: job name carries the revision", job["metadata"]["name"].endswith("-place-3"))
            check(f"{case}: plan file per revision", plan == "/var/lib/moe/plan/plan-3.json", str(plan))
        else:
            inits = dep["spec"]["template"]["spec"].get("initContainers", [])
            planner = inits[0] if inits else {}
            check(f"{case}: no Job in initContainer mode", not by_kind(objs, "Job"))
        args = planner.get("args", [])
        check(f"{case}: planner writes the plan the server reads", plan in args, str(args))
        check(f"{case}: planner runs moe-place", planner.get("command") == ["moe-place"], str(planner.get("command")))
        trace = "/var/lib/moe/traces/" + placement.get("traces", {}).get("file", "trace.jsonl")
        check(f"{case}: planner reads the trace", trace in args, str(args))
    else:
        check(f"{case}: no placement objects", not by_kind(objs, "Job") and "initContainers" not in dep["spec"]["template"]["spec"])


def validate_schemas(case, objs):
    for template, obj in objs:
        for version in KUBE_VERSIONS:
            what = f"{case}: {template} {obj['kind']} against Kubernetes {version}"
            try:
                kubernetes_validate.validate(obj, version, strict=True)
                check(what, True)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                check(what, False, f"{path}: {e.message}")


def expect_render_error(case, values, needle):
    try:
        render(values)
        check(f"{case}: render fails", False, "rendered without error")
    except helm.HelmError as e:
        check(f"{case}: render fails naming the problem", needle in str(e), str(e))


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="moe-chart-")
    os.makedirs(out_dir, exist_ok=True)
    print(f"helm SDK {helm.helm_sdk_version()}, kubernetes-validate {kubernetes_validate.version.__version__}, "
          f"schemas {', '.join(KUBE_VERSIONS)}")

    report = helm.lint(CHART, strict=True, kube_version="v" + KUBE_VERSIONS[0])
    problems = [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]
    check("helm lint --strict", not problems, str(problems))

    cases = [("defaults", {})]
    for f in sorted(os.listdir(CI_VALUES)):
        if f.endswith(".yaml"):
            with open(os.path.join(CI_VALUES, f)) as fh:
                cases.append((f[: -len(".yaml")], yaml.safe_load(fh) or {}))
    total = 0
    for case, values in cases:
        report = helm.lint(CHART, values, strict=True, kube_version="v" + KUBE_VERSIONS[0])
        problems = [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]
        check(f"{case}: helm lint --strict", not problems, str(problems))
        manifests = render(values)
        with open(os.path.join(out_dir, case + ".yaml"), "w") as fh:
            for template, text in sorted(manifests.items()):
                if text.strip() and not template.endswith("NOTES.txt"):
                    fh.write(f"---\n# Source: {template}\n{text.strip()}\n")
        objs = objects(manifests)
        total += len(objs)
        check_common(case, objs)
        check_case(case, values, objs)
        validate_schemas(case, objs)

    expect_render_error("api key without a value", {"apiKey": {"enabled": True}}, "apiKey.value")
    expect_render_error("model volume without a path", {"model": {"volume": {"emptyDir": {}}}}, "model.path")
    cluster = "nodes = 1\ngpus_per_node = 2\n"
    expect_render_error("placement without a cluster", {"placement": {"enabled": True}}, "placement.cluster")
    expect_render_error(
        "placement without traces", {"placement": {"enabled": True, "cluster": cluster}}, "placement.traces.volume"
    )
    expect_render_error(
        "placement job without a plan volume",
        {"placement": {"enabled": True, "mode": "job", "cluster": cluster, "traces": {"volume": {"emptyDir": {}}}}},
        "placement.planVolume",
    )
    expect_render_error(
        "unknown placement mode",
        {"placement": {"enabled": True, "mode": "sidecar", "cluster": cluster, "traces": {"volume": {"emptyDir": {}}}}},
        "placement.mode",
    )
    expect_render_error("chart-owned setting in config", {"config": {"MOE_PORT": "9000"}}, "config.MOE_PORT")

    print(f"{len(cases)} value sets, {total} objects rendered to {out_dir}")
    print(f"chart: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
