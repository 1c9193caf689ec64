"""Validates deploy/ offline; run by `cargo xtask validate-deploy` with the tools' venv.

Every object xtask rendered (kubectl kustomize, helm template) and every example is
checked strictly: built-in kinds against each Kubernetes release's OpenAPI schemas
(kubernetes-validate, unknown fields refused), xlb.dev objects against the
openAPIV3Schema of deploy/crds (unknown fields refused, as `kubectl apply`'s
server-side strict field validation does). A kind with no schema is an error, never
a warning. Then a few cross-references a schema cannot see, and the Helm chart's
default output compared with kustomize's.

usage: validate_deploy.py K8S_VERSIONS CRD_DIR --rendered NAME=FILE[,FILE]...
       --examples FILE... --readme README --same KUSTOMIZE_NAME HELM_NAME
(one NAME is one install: its FILEs together)
"""

import argparse
import copy
import glob
import os
import re
import sys

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, schema_contents
from referencing import Registry, Resource

# Labels Helm adds (helm.sh/chart and the app.kubernetes.io/ ones it manages); the
# kustomize output has only app.kubernetes.io/name, so they are left out of the
# comparison.
HELM_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
}

# prometheus-operator's CRD is not available offline: the fields deploy/ uses, in
# its shape (monitoring.coreos.com/v1), unknown fields refused.
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scheme": {"enum": ["http", "https"]},
                        },
                    },
                },
            },
        },
    },
}

CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "Node",
}


class Checker:
    def __init__(self, versions, crd_dir):
        self.versions = versions
        version = versions[-1]
        self.errors = []
        self.checked = 0
        # The newest release's ObjectMeta (strict) for xlb.dev objects' metadata.
        defs = schema_contents(
            f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version
        )
        self.registry = Resource.from_contents(defs) @ Registry()
        self.object_meta = {
            "$ref": f"{defs['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
        }
        self.crds = {}
        self.crd_files = {}
        for path in sorted(glob.glob(os.path.join(crd_dir, "*.yaml"))):
            with open(path) as f:
                crd = yaml.safe_load(f)
            self.crd_files[crd["metadata"]["name"]] = os.path.basename(path)
            self.object(crd, path)
            spec = crd["spec"]
            for v in spec["versions"]:
                schema = v["schema"]["openAPIV3Schema"]
                self.structural(schema, f"{path}: openAPIV3Schema")
                gv = f"{spec['group']}/{v['name']}"
                self.crds[(gv, spec["names"]["kind"])] = self.crd_schema(
                    schema, gv, spec["names"]["kind"]
                )

    def fail(self, where, msg):
        self.errors.append(f"{where}: {msg}")

    def structural(self, node, where):
        """The API server refuses a CRD whose schema is not structural: every node
        says its type (or is int-or-string / preserves unknown fields)."""
        if not isinstance(node, dict):
            return
        if (
            "type" not in node
            and not node.get("x-kubernetes-int-or-string")
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            self.fail(where, "schema node without a type (not structural)")
        for name, sub in node.get("properties", {}).items():
            self.structural(sub, f"{where}.{name}")
        if isinstance(node.get("items"), dict):
            self.structural(node["items"], f"{where}[]")
        if isinstance(node.get("additionalProperties"), dict):
            self.structural(node["additionalProperties"], f"{where}{{}}")

    def crd_schema(self, schema, gv, kind):
        """openAPIV3Schema as JSON Schema: nullable as a null type, unknown fields
        refused, int-or-string; plus what the API server adds for every resource
        (apiVersion, kind, ObjectMeta)."""

        def convert(node):
            node = dict(node)
            if "properties" in node:
                node["properties"] = {n: convert(s) for n, s in node["properties"].items()}
            if isinstance(node.get("items"), dict):
                node["items"] = convert(node["items"])
            if isinstance(node.get("additionalProperties"), dict):
                node["additionalProperties"] = convert(node["additionalProperties"])
            if node.pop("x-kubernetes-int-or-string", False):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            preserve = node.pop("x-kubernetes-preserve-unknown-fields", False)
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not preserve
            ):
                node["additionalProperties"] = False
            if node.pop("nullable", False) and "type" in node:
                node["type"] = [node["type"], "null"]
            return {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}

        out = convert(schema)
        out.setdefault("properties", {})
        out["properties"]["apiVersion"] = {"const": gv}
        out["properties"]["kind"] = {"const": kind}
        out["properties"]["metadata"] = self.object_meta
        out["additionalProperties"] = False
        out.setdefault("required", [])
        out["required"] = sorted(set(out["required"]) | {"apiVersion", "kind", "metadata"})
        return out

    def object(self, obj, where):
        self.checked += 1
        if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
            self.fail(where, "not a Kubernetes object (no apiVersion/kind)")
            return
        name = f"{obj['kind']}/{obj.get('metadata', {}).get('name', '?')}"
        where = f"{where}: {name}"
        key = (obj["apiVersion"], obj["kind"])
        if key in self.crds:
            self.jsonschema(self.crds[key], obj, where)
        elif key == ("monitoring.coreos.com/v1", "ServiceMonitor"):
            self.jsonschema(SERVICE_MONITOR, obj, where)
        else:
            for version in self.versions:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    path = ".".join(str(p) for p in e.path)
                    self.fail(where, f"Kubernetes {version}: {path}: {e.message}")
                except SchemaNotFoundError as e:
                    self.fail(where, e.message)

    def jsonschema(self, schema, obj, where):
        v = jsonschema.validators.Draft202012Validator(schema, registry=self.registry)
        for e in sorted(v.iter_errors(obj), key=lambda e: list(map(str, e.path))):
            path = ".".join(str(p) for p in e.path)
            self.fail(where, f"{path}: {e.message}")

    def deploy_set(self, objs, where, namespace):
        """What a schema cannot see: references between the objects."""
        by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
        for o in objs:
            at = f"{where}: {o['kind']}/{o['metadata']['name']}"
            ns = o["metadata"].get("namespace")
            if o["kind"] in CLUSTER_SCOPED:
                if ns is not None:
                    self.fail(at, f"cluster-scoped but has namespace {ns}")
            elif ns != namespace:
                self.fail(at, f"namespace {ns!r}, not {namespace!r}")
            if o["kind"] in ("ClusterRoleBinding", "RoleBinding"):
                ref = o["roleRef"]
                if (ref["kind"], ref["name"]) not in by:
                    self.fail(at, f"roleRef {ref['kind']}/{ref['name']} is not rendered")
                for s in o["subjects"]:
                    if ("ServiceAccount", s["name"]) not in by or s.get("namespace") != namespace:
                        self.fail(at, f"subject {s} is not the rendered ServiceAccount")
            if o["kind"] == "DaemonSet":
                pod = o["spec"]["template"]["spec"]
                if ("ServiceAccount", pod.get("serviceAccountName")) not in by:
                    self.fail(at, "serviceAccountName is not the rendered ServiceAccount")
                sel = o["spec"]["selector"]["matchLabels"]
                labels = o["spec"]["template"]["metadata"]["labels"]
                if any(labels.get(k) != v for k, v in sel.items()):
                    self.fail(at, "selector does not match the pod template's labels")
            if o["kind"] == "Service":
                ds = [d for d in objs if d["kind"] == "DaemonSet"]
                pod = ds[0]["spec"]["template"] if ds else {}
                labels = pod.get("metadata", {}).get("labels", {})
                if any(labels.get(k) != v for k, v in o["spec"]["selector"].items()):
                    self.fail(at, "selector matches no DaemonSet pod")
                names = {
                    p.get("name")
                    for c in pod.get("spec", {}).get("containers", [])
                    for p in c.get("ports", [])
                }
                for p in o["spec"]["ports"]:
                    if p.get("targetPort") not in names:
                        self.fail(at, f"targetPort {p.get('targetPort')} is no container port")
            if o["kind"] == "ServiceMonitor":
                svcs = [s for s in objs if s["kind"] == "Service"]
                sel = o["spec"]["selector"]["matchLabels"]
                hit = [
                    s
                    for s in svcs
                    if all(s["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())
                ]
                if len(hit) != 1:
                    self.fail(at, f"selects {len(hit)} Services, not the metrics Service")
        crds = {o["metadata"]["name"] for o in objs if o["kind"] == "CustomResourceDefinition"}
        if any(o["kind"] == "DaemonSet" for o in objs) and crds != set(self.crd_files):
            self.fail(where, f"CRDs {sorted(crds)} are not deploy/crds {sorted(self.crd_files)}")


def self_test(c, rendered, examples):
    """The checks can fail: broken copies of real objects must each be refused."""
    ds = next(o for objs in rendered.values() for o in objs if o["kind"] == "DaemonSet")
    crd_obj = next(o for o in examples if str(o.get("apiVersion")).startswith("xlb.dev/"))
    broken = []
    b = copy.deepcopy(ds)
    pod = b["spec"]["template"]["spec"]
    pod["terminationGracePeriodSecond"] = pod.pop("terminationGracePeriodSeconds")
    broken.append(("a DaemonSet with a misspelled field", b))
    b = copy.deepcopy(ds)
    b["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = [9464]
    broken.append(("a DaemonSet with a port of the wrong type", b))
    b = copy.deepcopy(ds)
    b["kind"] = "DaemonSett"
    broken.append(("a kind no schema knows", b))
    b = copy.deepcopy(crd_obj)
    b["spec"]["bogus"] = True
    broken.append((f"a {crd_obj['kind']} with an unknown field", b))
    b = copy.deepcopy(crd_obj)
    b["metadata"]["labelz"] = {}
    broken.append((f"a {crd_obj['kind']} with misspelled metadata", b))
    for what, obj in broken:
        before = len(c.errors)
        c.object(obj, "self-test")
        if len(c.errors) == before:
            c.fail("self-test", f"{what} was accepted")
        del c.errors[before:]
    return len(broken)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def readme_examples(path):
    """YAML blocks of the README that are xlb.dev objects (its documented examples)."""
    with open(path) as f:
        text = f.read()
    out = []
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        docs = [d for d in yaml.safe_load_all(block) if d]
        out += [d for d in docs if str(d.get("apiVersion", "")).startswith("xlb.dev/")]
    return out


def differences(a, b, path=""):
    """Where two parsed objects differ, as paths (at most a few)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += differences(a.get(k), b.get(k), f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path or '.'}: {a!r} vs {b!r}"]


def strip_helm(obj):
    obj = copy.deepcopy(obj)
    labels = obj.get("metadata", {}).get("labels")
    if labels is not None:
        for k in HELM_LABELS:
            labels.pop(k, None)
    return obj


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("versions", help="Kubernetes releases, oldest first: 1.30.0,1.37.0")
    ap.add_argument("crd_dir")
    ap.add_argument("--rendered", nargs="+", default=[], metavar="NAME=FILE[,FILE]")
    ap.add_argument("--examples", nargs="*", default=[])
    ap.add_argument("--readme")
    ap.add_argument("--namespace", default="xlb-system")
    ap.add_argument("--same", nargs=2, metavar=("KUSTOMIZE", "HELM"))
    args = ap.parse_args()

    versions = args.versions.split(",")
    c = Checker(versions, args.crd_dir)
    rendered = {}
    for spec in args.rendered:
        name, paths = spec.split("=", 1)
        objs = [o for path in paths.split(",") for o in load(path)]
        if not objs:
            c.fail(name, "rendered nothing")
        rendered[name] = objs
        for o in objs:
            c.object(o, name)
        if not c.errors:
            c.deploy_set(objs, name, args.namespace)
    examples = []
    for path in args.examples:
        for o in load(path):
            examples.append(o)
            c.object(o, path)
    if args.readme:
        documented = readme_examples(args.readme)
        if not documented:
            c.fail(args.readme, "no xlb.dev examples found")
        for o in documented:
            examples.append(o)
            c.object(o, f"{args.readme} (example)")
    if args.same:
        k, h = (rendered[n] for n in args.same)
        key = lambda o: (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])
        ks = {key(o): o for o in k if o["kind"] != "Namespace"}
        # The membership key Secret is the chart's alone: kustomize cannot generate a
        # random key (deploy/ users create it, README: Kubernetes).
        helm_only = {("Secret", args.namespace, "xlb-memberlist")}
        hs = {key(strip_helm(o)): strip_helm(o) for o in h if key(o) not in helm_only}
        for kk in sorted(set(ks) | set(hs)):
            if kk not in hs:
                c.fail(args.same[1], f"has no {kk} (kustomize does)")
            elif kk not in ks:
                c.fail(args.same[1], f"has {kk}, kustomize does not")
            elif ks[kk] != hs[kk]:
                diff = "; ".join(differences(ks[kk], hs[kk])[:5])
                c.fail(args.same[1], f"{kk} differs from kustomize's ({diff})")

    checked = c.checked
    refused = self_test(c, rendered, examples) if not c.errors else 0
    c.checked = checked
    for e in c.errors:
        print(f"validate-deploy: FAIL {e}", file=sys.stderr)
    if c.errors:
        return 1
    print(
        f"validate-deploy: {c.checked} objects valid against Kubernetes {' and '.join(versions)} "
        f"(strict) and deploy/crds"
        + ("; the Helm chart renders what kustomize renders" if args.same else "")
        + f"; {refused} broken copies refused"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
