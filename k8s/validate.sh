#!/usr/bin/env bash
# Validates the Kubernetes deployment in k8s/ without a cluster (CI runs it):
#
#   1. renders both variants with `kubectl kustomize` (k8s/ and k8s/cilium/),
#      and k8s/ with the TLS components (k8s/tls, k8s/tls/cert-manager);
#   2. validates every built-in object against the Kubernetes 1.28.0 API
#      schemas with kubernetes-validate --strict (unknown fields fail);
#      CiliumNetworkPolicy has no bundled schema, so it is validated against
#      k8s/schemas/ciliumnetworkpolicy-v2.subset.json instead (step 3);
#   3. cross-checks what no schema can (k8s/tools/check_rendered.py): peers
#      vs replicas, config keys vs broker/src/config.rs, ports, capabilities,
#      policies, checkov suppressions carrying a reason;
#   4. runs checkov on the rendered manifests and k8s/Dockerfile: any finding
#      not suppressed with a reason in the manifest fails;
#   5. runs the real node agent (a built sockbus-broker) with exactly the
#      DaemonSet's uid and capabilities and checks it attaches and redirects,
#      and that it fails with any one capability fewer (root only; skipped,
#      with the reason printed, where it cannot run).
#
#   k8s/validate.sh             the checks above (under a minute once tools are in)
#   k8s/validate.sh --build     also builds the image's binaries the way
#                               k8s/Dockerfile does (into target/k8s, or
#                               $K8S_BUILD_TARGET_DIR) and checks they run on
#                               its runtime image (slow: a release build)
#   k8s/validate.sh --refreeze  re-resolves k8s/tools/constraints.txt
#
# Installs its tools idempotently into target/k8s-tools/venv (pinned in
# k8s/tools/requirements.txt, frozen in constraints.txt). Exits non-zero if
# anything fails, after running every step, and prints a summary.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
KUBE_VERSION=1.28.0
UV_VERSION=0.13.9
# distroless/cc-debian12 ships glibc 2.36: the binaries must not need newer.
RUNTIME_GLIBC=2.36
venv=${K8S_TOOLS_VENV:-$root/target/k8s-tools/venv}
out=$root/target/k8s-validate

build=0
refreeze=0
for arg in "$@"; do
    case $arg in
        --build) build=1 ;;
        --refreeze) refreeze=1 ;;
        *) echo "usage: k8s/validate.sh [--build] [--refreeze]" >&2; exit 2 ;;
    esac
done

started=$SECONDS
failures=0
declare -a summary
say() { echo "validate: $*"; }
record() { summary+=("$(printf '%-14s %s' "$1" "$2")"); }
fail() { failures=$((failures + 1)); record "$1" "FAIL: $2"; say "FAIL $1: $2"; }

# --- tools -------------------------------------------------------------------
install_tools() {
    local py
    py=$(command -v python3) || { say "python3 (3.11+) is required"; exit 1; }
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { say "python3 is $("$py" --version), 3.11+ is required (tomllib)"; exit 1; }
    local want
    want="$(cat "$here/tools/requirements.txt" "$here/tools/constraints.txt" | sha256sum | cut -c1-16) uv=$UV_VERSION"
    if [ "$refreeze" = 0 ] && [ -x "$venv/bin/checkov" ] && [ "$(cat "$venv/.sockbus-tools" 2>/dev/null)" = "$want" ]; then
        return
    fi
    say "installing tools into ${venv#"$root"/} (uv $UV_VERSION, pinned: $(grep -v '^#' "$here/tools/requirements.txt" | tr '\n' ' '))"
    rm -rf "$venv"
    "$py" -m venv "$venv" || exit 1
    "$venv/bin/pip" install -q --disable-pip-version-check "uv==$UV_VERSION" || exit 1
    if [ "$refreeze" = 1 ]; then
        "$venv/bin/uv" pip install -q --python "$venv/bin/python" -r "$here/tools/requirements.txt" || exit 1
        {
            sed -n '1,3p' "$here/tools/constraints.txt"
            "$venv/bin/uv" pip freeze -q --python "$venv/bin/python" | grep -v -E '^(pip|setuptools|uv)=='
        } > "$here/tools/constraints.txt.new" && mv "$here/tools/constraints.txt.new" "$here/tools/constraints.txt"
        say "wrote k8s/tools/constraints.txt"
        want="$(cat "$here/tools/requirements.txt" "$here/tools/constraints.txt" | sha256sum | cut -c1-16) uv=$UV_VERSION"
    else
        "$venv/bin/uv" pip install -q --python "$venv/bin/python" \
            -r "$here/tools/requirements.txt" -c "$here/tools/constraints.txt" || exit 1
    fi
    echo "$want" > "$venv/.sockbus-tools"
}

install_tools
bin=$venv/bin
kubectl_version=$("$bin/kubectl" version --client 2>/dev/null | awk '/Client Version/ {print $3}')
kustomize_version=$("$bin/kubectl" version --client 2>/dev/null | awk '/Kustomize Version/ {print $3}')
kv_version=$("$bin/kubernetes-validate" --version 2>/dev/null | awk '{print $NF}')
checkov_version=$("$bin/checkov" --version 2>/dev/null)
jsonschema_version=$("$bin/python" -c 'import importlib.metadata as m; print(m.version("jsonschema"))')
record tools "kubectl $kubectl_version (kustomize $kustomize_version), kubernetes-validate $kv_version, checkov $checkov_version, jsonschema $jsonschema_version, python $("$bin/python" -c 'import platform; print(platform.python_version())')"

rm -rf "$out"
mkdir -p "$out"

# --- 1. render ---------------------------------------------------------------
rendered_ok=1
# The TLS component as a user's overlay composes it (an overlay cannot live
# inside the base it points at, so it is written here).
mkdir -p "$out/tls-example"
cat > "$out/tls-example/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../../k8s
components:
  - ../../../k8s/tls
  - ../../../k8s/tls/cert-manager
EOF
for variant in base cilium tls; do
    dir=$here
    [ "$variant" = cilium ] && dir=$here/cilium
    [ "$variant" = tls ] && dir=$out/tls-example
    if "$bin/kubectl" kustomize "$dir" > "$out/$variant.yaml" 2> "$out/$variant.render.log"; then
        n=$(grep -c '^kind:' "$out/$variant.yaml")
        record "render" "${dir#"$root"/}/: $n objects -> target/k8s-validate/$variant.yaml"
    else
        cat "$out/$variant.render.log"
        fail render "kubectl kustomize ${dir#"$root"/}"
        rendered_ok=0
    fi
done

if [ "$rendered_ok" = 1 ]; then
    # --- 2. Kubernetes API schemas --------------------------------------------
    for variant in base cilium tls; do
        "$bin/python" "$here/tools/check_rendered.py" split "$out/$variant.yaml" \
            "$out/$variant.builtin.yaml" "$out/$variant.crds.yaml" > /dev/null
    done
    say "kubernetes-validate -k $KUBE_VERSION --strict"
    "$bin/kubernetes-validate" -k "$KUBE_VERSION" --strict "$out/base.builtin.yaml" "$out/cilium.builtin.yaml" "$out/tls.builtin.yaml" \
        > "$out/kubernetes-validate.log" 2>&1
    rc=$?
    passed=$(grep -c ' passed for resource ' "$out/kubernetes-validate.log")
    # A kind without a schema (a typo in apiVersion, say) is only a warning
    # to the tool; here it is a failure.
    problems=$(grep -v ' passed for resource ' "$out/kubernetes-validate.log")
    if [ "$rc" = 0 ] && [ -z "$problems" ] && [ "$passed" -gt 0 ]; then
        record "schema $KUBE_VERSION" "$passed objects valid (strict), all three variants"
    else
        echo "$problems"
        fail "schema $KUBE_VERSION" "kubernetes-validate: see target/k8s-validate/kubernetes-validate.log"
    fi
    crds=$(grep -c '^kind: CiliumNetworkPolicy' "$out/cilium.crds.yaml")
    record "custom res." "$crds CiliumNetworkPolicy: no cilium.io schema is bundled with kubernetes-validate; checked against k8s/schemas/ciliumnetworkpolicy-v2.subset.json (strict) in the consistency step"

    # --- 3. consistency ---------------------------------------------------------
    say "consistency checks (k8s/tools/check_rendered.py)"
    "$bin/python" "$here/tools/check_rendered.py" check "$root" "$out/base.yaml" "$out/cilium.yaml" "$out/tls.yaml" \
        > "$out/consistency.log" 2>&1
    rc=$?
    grep -E 'FAIL|Traceback|Error' "$out/consistency.log"
    line=$(tail -1 "$out/consistency.log")
    if [ "$rc" = 0 ]; then
        record consistency "${line#consistency: }"
    else
        tail -5 "$out/consistency.log"
        fail consistency "${line#consistency: } (target/k8s-validate/consistency.log)"
    fi

    # --- 4. checkov ---------------------------------------------------------------
    # Scans the full base rendering, the Cilium policies (the rest of that
    # variant is identical, which step 3 checks) and the Dockerfile.
    say "checkov $checkov_version"
    mkdir -p "$out/checkov"
    cp "$out/base.yaml" "$out/checkov/sockbus.yaml"
    cp "$out/cilium.crds.yaml" "$out/checkov/sockbus-cilium-policies.yaml"
    cp "$here/Dockerfile" "$out/checkov/Dockerfile"
    (cd "$out/checkov" && "$bin/checkov" --directory . --framework kubernetes dockerfile \
        --skip-download --compact --quiet -o cli -o json --output-file-path console,checkov.json) \
        > "$out/checkov.log" 2>&1
    rc=$?
    grep -v -E '^\s*$' "$out/checkov.log" | grep -v -E 'prismacloud|bridgecrew' | head -60
    if counts=$("$bin/python" - "$out/checkov/checkov.json" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
reports = data if isinstance(data, list) else [data]
bad = 0
parts = []
for r in reports:
    s = r["summary"]
    bad += s["failed"] + s["parsing_errors"]
    parts.append(f'{r["check_type"]}: {s["passed"]} passed, {s["failed"]} failed, '
                 f'{s["skipped"]} skipped with a reason, {s["parsing_errors"]} parse errors')
print("; ".join(parts))
sys.exit(1 if bad or len(reports) < 2 else 0)
EOF
    ) && [ "$rc" = 0 ]; then
        record checkov "$counts"
    else
        fail checkov "${counts:-no results} (target/k8s-validate/checkov.log)"
    fi
fi

# --- 5. the node agent with exactly the DaemonSet's privileges ------------------------
# Runs the real `sockbus-broker accel agent` as the DaemonSet does: the uid and
# capabilities read from the rendered manifest (nothing else in the bounding
# set), no_new_privs, the cgroup2 root bind-mounted read-only and passed as
# --cgroup. It must attach and redirect traffic between two sockets; with any
# one capability removed it must fail. A scratch cgroup and free ports keep the
# host's own traffic out of it.
agent_step() {
    local why=""
    [ "$(id -u)" = 0 ] || why="not root (loading BPF programs needs it)"
    for t in unshare setpriv curl; do
        [ -n "$why" ] || command -v "$t" > /dev/null || why="$t is not installed"
    done
    local agent=""
    if [ -z "$why" ]; then
        for b in "${SOCKBUS_BROKER_BIN:-}" "$root/target/debug/sockbus-broker" \
                 "$root/target/release/sockbus-broker" "$root/target/k8s/release/sockbus-broker"; do
            if [ -n "$b" ] && [ -x "$b" ] && "$b" accel agent --help > /dev/null 2>&1; then
                agent=$b
                break
            fi
        done
        [ -n "$agent" ] || why="no sockbus-broker with \`accel agent\` built (cargo build -p sockbus-broker, or SOCKBUS_BROKER_BIN)"
    fi
    local cg2=""
    if [ -z "$why" ]; then
        # The first cgroup2 mount of a hierarchy root: "<id> <parent> <dev> / <mountpoint> ... - cgroup2 ..."
        cg2=$(awk '{ split($0, p, " - "); split(p[2], t, " "); if (t[1] == "cgroup2" && $4 == "/") { print $5; exit } }' /proc/self/mountinfo)
        [ -n "$cg2" ] || why="no cgroup2 mounted on this machine"
    fi
    if [ -n "$why" ]; then
        record "agent privs" "skipped: $why"
        return
    fi
    local uid caps
    read -r uid caps < <("$bin/python" "$here/tools/check_rendered.py" agent-privileges "$out/base.yaml")
    local name="sockbus-k8s-validate-$$" mnt="$out/agent/host-cgroup"
    local scratch="$cg2/$name"
    if ! mkdir -p "$mnt" || ! mkdir "$scratch"; then
        fail "agent privs" "cannot create cgroup $scratch"
        return
    fi
    local ports port mport
    ports=$("$bin/python" -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1", 0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
    read -r port mport <<< "$ports"

    run_agent() { # $1: capabilities, comma separated (may be empty); $2: log file
        local bset="-all"
        [ -z "$1" ] || bset="-all,+${1//,/,+}"
        # shellcheck disable=SC2016 # expanded by the inner shell
        unshare --mount --propagation private bash -c '
            mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" || exit 99
            shift 2
            exec "$@"' _ "$cg2" "$mnt" \
            setpriv --reuid "$uid" --bounding-set "$bset" --inh-caps -all --no-new-privs -- \
            "$agent" accel agent --cgroup="$mnt/$name" --ports="$port" --metrics="127.0.0.1:$mport" \
            > "$2" 2>&1 &
        agent_pid=$!
    }

    local ok=1 detail=""
    run_agent "$caps" "$out/agent/agent.log"
    for _ in $(seq 50); do
        curl -fs "127.0.0.1:$mport/healthz" > /dev/null 2>&1 && break
        kill -0 "$agent_pid" 2> /dev/null || break
        sleep 0.2
    done
    if curl -fs "127.0.0.1:$mport/healthz" > /dev/null 2>&1; then
        # 200 round trips between two sockets in the scratch cgroup (bounded:
        # a fast path that lost data would otherwise hang here).
        # shellcheck disable=SC2016 # expanded by the inner shell
        timeout 30 bash -c 'echo $$ > "$1/cgroup.procs" && exec "$2" "$3" "$4"' _ \
            "$scratch" "$bin/python" "$here/tools/roundtrips.py" "$port" \
            || { ok=0; detail="the round trips through the fast path failed or timed out; "; }
        local redirected
        redirected=$(curl -fs "127.0.0.1:$mport/metrics" | awk '/^sockbus_accel_redirect_verdicts_total / {print $2}')
        # One redirect verdict covers a connection's next 64 KiB of sends:
        # both ends of the connection redirected gives at least 2.
        if [ "$ok" = 1 ] && [ "${redirected:-0}" -ge 2 ]; then
            detail="uid $uid with only ${caps}, no_new_privs, read-only cgroup mount: attached, $redirected redirect verdicts"
        else
            ok=0; detail+="attached but ${redirected:-no} redirect verdicts (expected >= 2, one per end)"
        fi
    else
        ok=0; detail="did not attach with ${caps}: $(grep -v '^\s*$' "$out/agent/agent.log" | tail -1)"
    fi
    kill -TERM "$agent_pid" 2> /dev/null; wait "$agent_pid" 2> /dev/null

    # Each capability is needed: without it the agent must not come up.
    local cap fewer
    for cap in ${caps//,/ }; do
        fewer=$(echo ",$caps," | sed "s/,$cap,/,/; s/^,//; s/,$//")
        run_agent "$fewer" "$out/agent/without-$cap.log"
        for _ in $(seq 25); do kill -0 "$agent_pid" 2> /dev/null || break; sleep 0.2; done
        if kill -0 "$agent_pid" 2> /dev/null; then
            ok=0; detail+="; still attaches without $cap (drop it from the DaemonSet)"
            kill -TERM "$agent_pid" 2> /dev/null
        else
            detail+="; fails without $cap"
        fi
        wait "$agent_pid" 2> /dev/null
    done
    rmdir "$scratch" 2> /dev/null
    if [ "$ok" = 1 ]; then record "agent privs" "$detail"; else fail "agent privs" "$detail (target/k8s-validate/agent/)"; fi
}
if [ "$rendered_ok" = 1 ]; then
    say "node agent with the DaemonSet's privileges"
    agent_step
fi

# --- optional: the image's binaries -----------------------------------------------
if [ "$build" = 1 ]; then
    say "cargo build --release --locked -p sockbus-broker -p sockbus-client (as k8s/Dockerfile does)"
    target=${K8S_BUILD_TARGET_DIR:-$root/target/k8s}
    if (cd "$root" && CARGO_TARGET_DIR=$target cargo build --release --locked -p sockbus-broker -p sockbus-client); then
        mkdir -p "$out/image"
        ok=1
        for b in sockbus-broker sockbus; do
            objcopy --strip-debug "$target/release/$b" "$out/image/$b" || ok=0
            "$out/image/$b" --version > /dev/null || ok=0
            need=$(objdump -T "$out/image/$b" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
            [ "$(printf '%s\n%s\n' "$need" "$RUNTIME_GLIBC" | sort -V | tail -1)" = "$RUNTIME_GLIBC" ] || { say "$b needs glibc $need"; ok=0; }
            libs=$(objdump -p "$out/image/$b" | awk '/NEEDED/ {print $2}' | grep -v -E '^(libc|libm|libgcc_s|libdl|libpthread|librt|ld-linux-x86-64|ld-linux-aarch64)\.so' || true)
            [ -z "$libs" ] || { say "$b needs libraries distroless/cc lacks: $libs"; ok=0; }
            sizes+="$b $(du -h "$out/image/$b" | cut -f1), "
        done
        if [ "$ok" = 1 ]; then
            record build "${sizes%, } stripped; need glibc <= $RUNTIME_GLIBC and only glibc/libgcc_s libraries, which distroless/cc-debian12 has"
        else
            fail build "the binaries would not run on the runtime image"
        fi
    else
        fail build "cargo build --release --locked"
    fi
fi

# --- summary ---------------------------------------------------------------------
echo
echo "k8s validation summary"
for line in "${summary[@]}"; do echo "  $line"; done
if [ "$failures" = 0 ]; then
    echo "  result         OK in $((SECONDS - started)) s"
else
    echo "  result         $failures step(s) FAILED in $((SECONDS - started)) s"
    exit 1
fi
