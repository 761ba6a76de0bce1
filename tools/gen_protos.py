"""Regenerates the Python stubs of jinfer/serving/inference.proto (needs grpcio-tools, in the
`test` extra). Run from anywhere; writes inference_pb2.py and inference_pb2_grpc.py beside it.

  python tools/gen_protos.py            # in place
  python tools/gen_protos.py OUT_ROOT   # under OUT_ROOT/jinfer/serving/ (the test compares)
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO = os.path.join("jinfer", "serving", "inference.proto")


def main(out: str = ROOT) -> int:
    from grpc_tools import protoc
    return protoc.main(["protoc", f"-I{ROOT}", f"--python_out={out}", f"--grpc_python_out={out}",
                        os.path.join(ROOT, PROTO)])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
