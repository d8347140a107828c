"""kube-proxy's rule text as the lab writes it (pure functions; no root): chain names as upstream computes them,
the probabilities, and the one restore transaction that takes a node from what it has to what it should have."""

from __future__ import annotations

from pyflannel.lab import kubeproxy as kp

WEB = kp.ServicePort("default", "web", "http", "tcp", "10.96.0.11", 80, ("10.244.1.2:8080", "10.244.2.2:8080"), 30080)


def test_chain_names_are_upstreams() -> None:
    # Names seen on real clusters (kubeadm's kubernetes and kube-dns Services).
    assert kp.svc_chain("default/kubernetes:https", "tcp") == "KUBE-SVC-NPX46M4PTMTKRN6Y"
    assert kp.svc_chain("kube-system/kube-dns:dns", "udp") == "KUBE-SVC-TCOU7JCQXEZGVUNU"
    assert kp.svc_chain("kube-system/kube-dns:dns-tcp", "tcp") == "KUBE-SVC-ERIFXISQEP7F7OF4"
    assert kp.svc_chain("kube-system/kube-dns:metrics", "tcp") == "KUBE-SVC-JD5MR3NA4I4DYORP"
    assert kp.ext_chain("default/kubernetes:https", "tcp") == "KUBE-EXT-NPX46M4PTMTKRN6Y"
    assert WEB.spn == "default/web:http"
    a, b = (kp.sep_chain(WEB.spn, "tcp", ep) for ep in WEB.endpoints)
    assert a != b and a.startswith("KUBE-SEP-") and len(a) == len("KUBE-SEP-") + 16


def test_probabilities_and_order() -> None:
    three = kp.ServicePort("default", "x", "http", "tcp", "10.96.0.12", 80, ("a:1", "b:1", "c:1"))
    _, rules = kp.iptables_rules([three], "10.244.0.0/16")["nat"]
    svc = kp.svc_chain(three.spn, "tcp")
    balance = [r for r in rules if r.startswith(f"-A {svc} ") and "KUBE-SEP-" in r]
    assert ["--probability 0.3333333333" in balance[0], "--probability 0.5000000000" in balance[1]] == [True, True]
    assert "statistic" not in balance[2]
    assert rules[-1] == kp.NODEPORTS_LAST  # the nodeports jump is the last rule of KUBE-SERVICES


def test_restore_input_inserts_jumps_once_and_removes_everything() -> None:
    want = kp.iptables_rules([WEB], "10.244.0.0/16")
    first = kp.restore_input(want, "*nat\nCOMMIT\n*filter\nCOMMIT\n")
    assert first.count("-I PREROUTING 1 ") == 1 and first.count("-I POSTROUTING 1 ") == 1
    assert "-I FORWARD 1 " in first and first.count("COMMIT") == 2
    # What the node holds after it (as iptables-save prints it): the jumps are there, so none is added again.
    save = "*nat\n" + "".join(f":{c} - [0:0]\n" for c in want["nat"][0])
    save += (
        "".join(f"-A {hook} {spec}\n" for hook, spec in kp.JUMPS["nat"]) + "COMMIT\n*filter\n:KUBE-FORWARD - [0:0]\n"
    )
    save += "".join(f"-A {hook} {spec}\n" for hook, spec in kp.JUMPS["filter"]) + "COMMIT\n"
    again = kp.restore_input(want, save)
    assert "-I " not in again and "-X " not in again
    # Without the Service: its chains emptied and deleted, the base chains kept.
    base = kp.restore_input(kp.iptables_rules([], "10.244.0.0/16"), save)
    svc = kp.svc_chain(WEB.spn, "tcp")
    assert f"-X {svc}" in base and "-X KUBE-SERVICES" not in base
    # Nothing at all: every jump deleted before the chains go.
    gone = kp.restore_input(None, save).splitlines()
    assert gone.index('-D PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES') < gone.index(
        "-X KUBE-SERVICES"
    )
    assert {line[3:] for line in gone if line.startswith("-X ")} == set(want["nat"][0]) | {"KUBE-FORWARD"}
    assert kp.restore_input(None, "*nat\nCOMMIT\n") == ""


def test_ipvsadm_input() -> None:
    text = kp.ipvsadm_input([WEB], "192.168.77.11")
    assert text.splitlines() == [
        "-C",
        "-A -t 10.96.0.11:80 -s rr",
        "-a -t 10.96.0.11:80 -r 10.244.1.2:8080 -m -w 1",
        "-a -t 10.96.0.11:80 -r 10.244.2.2:8080 -m -w 1",
        "-A -t 192.168.77.11:30080 -s rr",
        "-a -t 192.168.77.11:30080 -r 10.244.1.2:8080 -m -w 1",
        "-a -t 192.168.77.11:30080 -r 10.244.2.2:8080 -m -w 1",
    ]
