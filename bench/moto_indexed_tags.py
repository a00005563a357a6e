"""moto's server with each EC2 resource's tags looked up by its id: a stand-in for benchmarks.

moto 5 answers ``get_tags()`` of one resource by scanning every tag of every
resource (``TagBackend.describe_tags`` with a resource-id filter), and calls it
for every instance it filters or renders: a DescribeInstances over n instances
costs O(n^2) in the emulator (2,500 instances: about 30 s). AWS does not behave
like that, so the scale benchmark would time moto instead of the factory. This
launcher answers the same lookup from moto's own tag store by key; requests,
responses and the request log are moto's, unchanged.

    python bench/moto_indexed_tags.py -H 127.0.0.1 -p PORT
"""

from __future__ import annotations

import sys

from moto.ec2.models.core import TaggedEC2Resource
from moto.ec2.models.tags import EC2_PREFIX_TO_RESOURCE
from moto.ec2.utils import get_prefix


def indexed_get_tags(self) -> list[dict[str, str]]:
    if not self.id:
        return []
    tags = self.ec2_backend.tags.get(self.id, {})  # .get: the store is a defaultdict, do not grow it
    kind = EC2_PREFIX_TO_RESOURCE.get(get_prefix(self.id), "")
    return [{"resource_id": self.id, "key": k, "value": v, "resource_type": kind} for k, v in tags.items()]


def install() -> None:
    TaggedEC2Resource.get_tags = indexed_get_tags


if __name__ == "__main__":
    from moto.server import main

    install()
    sys.exit(main(sys.argv[1:]))
