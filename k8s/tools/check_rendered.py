"""Checks on the rendered manifests that no schema can make.

    check_rendered.py split RENDERED.yaml BUILTIN_OUT.yaml CRD_OUT.yaml
        Writes the objects of built-in Kubernetes kinds and of custom
        resources (cilium.io) to separate files, so the Kubernetes schema
        validator sees only kinds it has schemas for.

    check_rendered.py check REPO_ROOT BASE.yaml CILIUM.yaml
        Cross-checks the two variants against each other, against the
        broker's config (broker/src/config.rs) and against the Cilium schema
        subset. Prints one line per check; exits 1 if any fails.

    check_rendered.py agent-privileges BASE.yaml
        Prints the node agent's uid and added capabilities (`0 bpf,net_admin,perfmon`)
        for validate.sh's agent step.

Runs in the validation venv (PyYAML and jsonschema come with checkov).
"""

import json
import re
import sys
import tomllib
from pathlib import Path

import jsonschema
import yaml

CRD_GROUPS = ("cilium.io", "cert-manager.io")


def load(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def group(obj):
    api = obj.get("apiVersion", "")
    return api.split("/")[0] if "/" in api else ""


def split(rendered, builtin_out, crd_out):
    docs = load(rendered)
    builtin = [d for d in docs if group(d) not in CRD_GROUPS]
    crds = [d for d in docs if group(d) in CRD_GROUPS]
    Path(builtin_out).write_text(yaml.safe_dump_all(builtin, sort_keys=False))
    Path(crd_out).write_text(yaml.safe_dump_all(crds, sort_keys=False))
    print(f"{rendered}: {len(builtin)} built-in objects, {len(crds)} custom resources")


class Checks:
    def __init__(self):
        self.failed = 0
        self.passed = 0

    def check(self, ok, what, why=""):
        if ok:
            self.passed += 1
            print(f"  ok    {what}")
        else:
            self.failed += 1
            print(f"  FAIL  {what}{': ' + why if why else ''}")


def find(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found


def one(docs, kind, name=None):
    found = find(docs, kind, name)
    if len(found) != 1:
        sys.exit(f"check_rendered: expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def container_ports(workload):
    return {
        p["name"]: p["containerPort"]
        for c in workload["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
    }


def broker_config_keys(root):
    """The TOML keys the broker accepts: the fields of `Options` in config.rs
    (kebab-case, as serde renames them), less `config` (serde-skipped)."""
    src = (root / "broker/src/config.rs").read_text()
    m = re.search(r"pub struct Options \{(.*?)\n\}", src, re.S)
    if not m:
        sys.exit("check_rendered: no `pub struct Options` in broker/src/config.rs")
    fields = re.findall(r"pub (\w+): Option<", m.group(1))
    return {f.replace("_", "-") for f in fields} - {"config"}


def duration_secs(s):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", s.strip())
    n, unit = int(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def check(root, base_path, cilium_path, tls_path=None):
    root = Path(root)
    base, cilium = load(base_path), load(cilium_path)
    c = Checks()

    sts = one(base, "StatefulSet")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    broker = pod["containers"][0]
    ports = container_ports(sts)
    cm = one(base, "ConfigMap")
    toml_text = cm["data"]["sockbus.toml"]

    print("broker config (ConfigMap) against broker/src/config.rs")
    cfg = tomllib.loads(toml_text)
    known = broker_config_keys(root)
    unknown = sorted(set(cfg) - known)
    c.check(not unknown, "every key is a broker setting", f"unknown: {unknown}; known: {sorted(known)}")
    c.check("node-id" not in cfg, "node-id is not in the shared file (each pod sets SOCKBUS_NODE_ID)")
    env = {e["name"]: e for e in broker.get("env", [])}
    c.check(
        env.get("SOCKBUS_NODE_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
        "SOCKBUS_NODE_ID comes from the pod name (downward API)",
    )
    args = broker.get("args", [])
    mounts = {m["name"]: m["mountPath"] for m in broker.get("volumeMounts", [])}
    cm_volume = next(v for v in pod["volumes"] if "configMap" in v)
    c.check(
        "--config" in args and args[args.index("--config") + 1] == f"{mounts[cm_volume['name']]}/sockbus.toml",
        "--config names the mounted ConfigMap file",
    )
    c.check(cm_volume["configMap"]["name"] == cm["metadata"]["name"], "the config volume uses the generated ConfigMap")
    c.check(port_of(cfg["listen"]) == ports["client"], "listen port = containerPort client")
    c.check(port_of(cfg["cluster"]) == ports["route"], "cluster port = containerPort route")
    c.check(port_of(cfg["http"]) == ports["http"], "http port = containerPort http")
    c.check(cfg.get("data-dir") == mounts.get("data"), "data-dir is the volumeClaimTemplate's mount")
    c.check("users" not in cfg, "no [[users]] in the ConfigMap (password hashes and tokens live in a Secret)")
    c.check(not cfg.get("allow-anonymous"), "clients authenticate (no allow-anonymous)")
    users_vol = next((v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "sockbus-users"), None)
    users_file = cfg.get("users-file") or ""
    c.check(
        users_vol is not None and users_file.rsplit("/", 1)[0] == mounts.get(users_vol["name"]),
        f"users-file {users_file!r} lies in the mounted Secret sockbus-users",
    )
    c.check(cfg.get("accel") == "off", "the broker leaves the fast path to the node agent (accel = off)")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    drain = duration_secs(cfg.get("drain-timeout", "10s"))
    c.check(grace >= drain + 5, f"terminationGracePeriodSeconds ({grace}) >= drain-timeout ({drain:g}s) + 5s")

    print("StatefulSet, headless Service and peers")
    replicas = spec["replicas"]
    headless = one(base, "Service", spec["serviceName"])
    c.check(headless["spec"].get("clusterIP") == "None", f"serviceName {spec['serviceName']} is headless")
    c.check(headless["spec"].get("publishNotReadyAddresses") is True, "peers resolve before they are ready")
    c.check(spec.get("podManagementPolicy") == "Parallel", "podManagementPolicy Parallel")
    name = sts["metadata"]["name"]
    want = [f"sockbus-route://{name}-{i}.{spec['serviceName']}:{ports['route']}" for i in range(replicas)]
    c.check(
        cfg.get("peers") == want,
        f"peers list every one of the {replicas} replicas by stable name",
        f"peers = {cfg.get('peers')}, expected {want}",
    )
    probes = {k: broker.get(k, {}).get("httpGet", {}) for k in ("livenessProbe", "readinessProbe")}
    c.check(probes["livenessProbe"].get("path") == "/healthz", "liveness probe GET /healthz")
    c.check(probes["readinessProbe"].get("path") == "/readyz", "readiness probe GET /readyz")
    c.check(all(p.get("port") in ("http", ports["http"]) for p in probes.values()), "probes use the http port")
    c.check(bool(spec.get("volumeClaimTemplates")), "volumeClaimTemplates give each replica its volume")
    pdb = one(base, "PodDisruptionBudget")
    c.check(
        pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"],
        "the PodDisruptionBudget selects the brokers",
    )

    print("Services point at named container ports")
    for svc in find(base, "Service"):
        for p in svc["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            ok = tp in ports if isinstance(tp, str) else tp in ports.values()
            c.check(ok and ports.get(tp, tp) == p["port"], f"Service {svc['metadata']['name']} port {p['name']}")

    print("node agent")
    ds = one(base, "DaemonSet")
    agent = ds["spec"]["template"]["spec"]["containers"][0]
    aargs = dict(a[2:].split("=", 1) for a in agent["args"] if a.startswith("--"))
    c.check(agent["args"][:2] == ["accel", "agent"], "runs `sockbus-broker accel agent`")
    accel_ports = {int(p) for p in aargs.get("ports", "").split(",") if p}
    c.check(accel_ports and accel_ports <= set(ports.values()), f"--ports {sorted(accel_ports)} are broker ports")
    c.check(ports["http"] not in accel_ports, "HTTP (no credit flow control) is never accelerated")
    aports = container_ports(ds)
    c.check(port_of(aargs.get("metrics", ":0")) == aports.get("metrics"), "--metrics port = containerPort metrics")
    sc = agent["securityContext"]
    caps = sc.get("capabilities", {})
    c.check(caps.get("drop") == ["ALL"], "drops ALL capabilities")
    c.check(sorted(caps.get("add", [])) == ["BPF", "NET_ADMIN", "PERFMON"], f"adds exactly BPF, NET_ADMIN and PERFMON (has {caps.get('add')})")
    c.check(sc.get("privileged") is False and sc.get("allowPrivilegeEscalation") is False, "not privileged, no escalation")
    dspec = ds["spec"]["template"]["spec"]
    c.check(not any(dspec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), "no host network, PID or IPC namespace")
    host_paths = sorted(v["hostPath"]["path"] for v in dspec["volumes"] if "hostPath" in v)
    c.check(host_paths == ["/sys/fs/cgroup"], f"the only host path is the cgroup v2 root ({host_paths})")
    amounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    c.check(amounts.get(aargs.get("cgroup"), {}).get("readOnly") is True,
            "--cgroup is the read-only host cgroup mount (not the pod's own cgroup)")
    c.check(all(p.get("httpGet", {}).get("port") == "metrics" for p in (agent.get("livenessProbe", {}), agent.get("readinessProbe", {}))),
            "agent probes use the metrics port")

    print("security contexts")
    for w in (sts, ds):
        for ctr in w["spec"]["template"]["spec"]["containers"]:
            s = ctr.get("securityContext", {})
            c.check(s.get("readOnlyRootFilesystem") is True, f"{w['kind']} {ctr['name']}: read-only root filesystem")
        seccomp = w["spec"]["template"]["spec"].get("securityContext", {}).get("seccompProfile", {})
        c.check(seccomp.get("type") == "RuntimeDefault", f"{w['kind']}: seccomp RuntimeDefault")
    bsc = broker["securityContext"]
    c.check(pod["securityContext"].get("runAsNonRoot") is True and bsc.get("capabilities", {}).get("drop") == ["ALL"]
            and not bsc.get("capabilities", {}).get("add"), "broker: non-root, no capabilities")

    print("checkov suppressions carry a reason")
    for d in base + find(cilium, "CiliumNetworkPolicy"):
        for k, v in (d["metadata"].get("annotations") or {}).items():
            if k.startswith("checkov.io/skip"):
                check_id, _, reason = v.partition("=")
                c.check(re.fullmatch(r"CKV2?_[A-Z0-9]+_\d+", check_id) and len(reason.strip()) >= 20,
                        f"{d['kind']} {d['metadata']['name']}: {check_id}")

    print("network policies")
    workloads = [sts, ds]

    def ports_of_selected(namespace, selector):
        out = set()
        for w in workloads:
            if w["metadata"]["namespace"] == namespace and labels_match(selector, w["spec"]["template"]["metadata"]["labels"]):
                out |= set(container_ports(w).values())
        return out

    nps = find(base, "NetworkPolicy")
    for np in nps:
        ns, sel = np["metadata"]["namespace"], np["spec"]["podSelector"]
        open_ports = {p["port"] for r in np["spec"].get("ingress", []) for p in r.get("ports", [])}
        if not open_ports:
            continue
        have = ports_of_selected(ns, sel) if sel else set()
        c.check(open_ports <= have, f"NetworkPolicy {ns}/{np['metadata']['name']}: ingress ports {sorted(open_ports)} exist on the selected pods")
    namespaces = {d["metadata"]["name"] for d in find(base, "Namespace")}
    for ns in sorted(namespaces):
        c.check(any(np["metadata"]["namespace"] == ns and np["spec"]["podSelector"] == {} for np in nps),
                f"namespace {ns} has a default-deny NetworkPolicy")

    print("Cilium variant")
    cnps = find(cilium, "CiliumNetworkPolicy")
    schema_path = root / "k8s/schemas/ciliumnetworkpolicy-v2.subset.json"
    validator = jsonschema.Draft7Validator(json.loads(schema_path.read_text()))
    for cnp in cnps:
        errors = sorted(validator.iter_errors(cnp), key=lambda e: list(e.path))
        c.check(not errors, f"CiliumNetworkPolicy {cnp['metadata']['namespace']}/{cnp['metadata']['name']} matches {schema_path.name}",
                "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:3]))
        ns, sel = cnp["metadata"]["namespace"], cnp["spec"]["endpointSelector"]
        open_ports = {int(p["port"]) for r in cnp["spec"].get("ingress", []) for tp in r.get("toPorts", []) for p in tp.get("ports", [])}
        if not open_ports:
            continue
        have = ports_of_selected(ns, sel) if sel else set()
        c.check(open_ports <= have, f"CiliumNetworkPolicy {ns}/{cnp['metadata']['name']}: ingress ports {sorted(open_ports)} exist on the selected pods")
    c.check(not find(cilium, "NetworkPolicy"), "the Cilium variant drops the Kubernetes NetworkPolicies")
    c.check({(p["metadata"]["namespace"], p["metadata"]["name"]) for p in cnps}
            == {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in nps},
            "one CiliumNetworkPolicy for each NetworkPolicy")
    strip = lambda docs: [d for d in docs if d["kind"] not in ("NetworkPolicy", "CiliumNetworkPolicy")]
    c.check(strip(base) == strip(cilium), "everything else is identical in both variants")
    c.check(not [d for d in base if group(d) in CRD_GROUPS], "the base needs no custom resource definitions")

    if tls_path:
        check_tls(c, base, load(tls_path), cfg)

    print(f"consistency: {c.passed} passed, {c.failed} failed")
    return 1 if c.failed else 0


def check_tls(c, base, tls, cfg):
    """The TLS component (k8s/tls, with tls/cert-manager) on the base."""
    print("TLS variant (k8s/tls + k8s/tls/cert-manager)")
    sts = one(tls, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    broker = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in broker.get("env", [])}
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in broker.get("volumeMounts", [])}
    secret_vol = {n for n, v in vols.items() if v.get("secret", {}).get("secretName") == "sockbus-tls"}
    c.check(len(secret_vol) == 1, "the Secret sockbus-tls is a volume of the broker pod")
    for var in ("SOCKBUS_TLS_CERT", "SOCKBUS_TLS_KEY", "SOCKBUS_CLUSTER_TLS_CA"):
        path = env.get(var) or ""
        d = path.rsplit("/", 1)[0]
        c.check(mounts.get(d) in secret_vol, f"{var}={path} lies in the mounted sockbus-tls Secret")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        c.check(broker.get(probe, {}).get("httpGet", {}).get("scheme") == "HTTPS",
                f"{probe} speaks HTTPS (the HTTP port is TLS now)")
    cert = one(tls, "Certificate")
    c.check(cert["spec"]["secretName"] == "sockbus-tls", "the Certificate writes the Secret the pod mounts")
    c.check({"server auth", "client auth"} <= set(cert["spec"].get("usages", [])),
            "the certificate serves and dials (server auth + client auth: routes)")
    hosts = {p.split("://", 1)[-1].rsplit(":", 1)[0] for p in cfg.get("peers", [])}
    names = set(cert["spec"].get("dnsNames", []))
    c.check(hosts and hosts <= names, "every peer URL host is in the certificate (routes verify it)",
            f"missing: {sorted(hosts - names)}")
    svc = {d["metadata"]["name"] for d in find(tls, "Service")}
    c.check("sockbus" in svc and "sockbus" in names, "the client Service's name is in the certificate")
    same = lambda docs: [d for d in docs if d["kind"] not in ("StatefulSet", "Certificate")]
    c.check(same(base) == same(tls), "the component changes nothing but the StatefulSet (and adds the Certificate)")


def agent_privileges(rendered):
    """Prints the node agent's uid and added capabilities, as setpriv wants
    them: `0 bpf,net_admin,perfmon`."""
    ds = one(load(rendered), "DaemonSet")
    sc = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    caps = ",".join(c.lower() for c in sc.get("capabilities", {}).get("add", []))
    print(sc.get("runAsUser", 0), caps)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "agent-privileges":
        agent_privileges(sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[1] == "split":
        split(*sys.argv[2:])
    elif len(sys.argv) in (5, 6) and sys.argv[1] == "check":
        sys.exit(check(*sys.argv[2:]))
    else:
        sys.exit(__doc__)
