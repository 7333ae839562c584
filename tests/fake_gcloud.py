"""A stand-in for `gcloud compute tpus ...` that keeps a queued resource and its node in a JSON
file and plays a scenario, logging every argv (tests/test_supervise.py).

State file ($FAKE_GCLOUD_STATE):
    {"qr": null | "WAITING_FOR_RESOURCES" | "ACTIVE" | "SUSPENDED" | ...,
     "node": null | "READY" | "PREEMPTED",
     "waits": describes that answer WAITING_FOR_RESOURCES after a create (then PROVISIONING, then ACTIVE),
     "runs": what each run does, in order: {"rc": 0} finishes; {"rc": 255, "preempt": true} is
             preempted (node PREEMPTED, queued resource SUSPENDING, then SUSPENDED); {"rc": 255} drops the connection;
             {"rc": 1} fails; {"rc": 42} stops on SIGTERM}
"""

import json
import os
import sys

NOT_FOUND = "ERROR: (gcloud.compute.tpus.{}.describe) NOT_FOUND: Resource '{}' was not found\n"


def main(argv):
    path = os.environ["FAKE_GCLOUD_STATE"]
    with open(os.environ["FAKE_CLOUD_LOG"], "a") as f:
        f.write(json.dumps(["gcloud", *argv]) + "\n")
    state = json.load(open(path))
    rc = act(state, argv)
    json.dump(state, open(path, "w"))
    return rc


def act(state, argv):
    if argv[:3] == ["compute", "tpus", "queued-resources"]:
        verb, name = argv[3], argv[4]
        if verb == "create":
            if state["qr"] is not None:
                sys.stderr.write(f"ERROR: ALREADY_EXISTS: {name}\n")
                return 1
            state["qr"], state["countdown"] = "WAITING_FOR_RESOURCES", state.get("waits", 0)
            return 0
        if verb == "describe":
            if state["qr"] is None:
                sys.stderr.write(NOT_FOUND.format("queued-resources", name))
                return 1
            if state["qr"] == "WAITING_FOR_RESOURCES":  # `waits` times, then PROVISIONING once, then ACTIVE
                state["countdown"] -= 1
                if state["countdown"] < 0:
                    state["qr"] = "PROVISIONING"
            elif state["qr"] == "PROVISIONING":
                state["qr"], state["node"] = "ACTIVE", "READY"
            print(state["qr"])
            if state["qr"] == "SUSPENDING":  # seen once
                state["qr"] = "SUSPENDED"
            return 0
        if verb == "delete":
            if state["node"] is not None and "--force" not in argv:
                sys.stderr.write("ERROR: FAILED_PRECONDITION: the queued resource has nodes: use --force\n")
                return 1
            state["qr"] = state["node"] = None
            return 0
    if argv[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
        if state["node"] is None:
            sys.stderr.write(NOT_FOUND.format("tpu-vm", argv[4]))
            return 1
        print(state["node"])
        return 0
    if argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
        command = argv[argv.index("--command") + 1]
        if state["node"] != "READY":
            sys.stderr.write("ssh: connect to host: Connection refused\n")
            return 255
        if "-m spin_jax " not in command or "pkill" in command:  # install, --setup, stopping leftovers
            print("set-up done")
            return 0
        run = state["runs"].pop(0)
        print("[spin-jax] train: step 1 ...")
        if run.get("preempt"):
            state["node"], state["qr"] = "PREEMPTED", "SUSPENDING"
        if run["rc"] == 1:
            print("spin-jax train: error: data.name: no such dataset")
        return run["rc"]
    sys.stderr.write(f"fake gcloud: unexpected {argv}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
