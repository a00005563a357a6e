"""Launch markers at an EC2-compatible endpoint: a key pair or a security group per launch.

Both are named ``glidein.<factory>.<entry>.<launch id>`` (``ec2_profiles.key_name``),
made before RunInstances, read back from each listed instance (its KeyName,
or the names of its security groups) and deleted once no live instance
carries them. A key pair is the default (every EC2 API has them and they
change nothing on the instance); a security group where the site keeps its
own ``key_name`` (the group allows nothing: the entry's own groups still
decide the network).
"""

from __future__ import annotations

from typing import Any


def _code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


class KeyPairMarker:
    kind = "key_pair"

    def __init__(self, hook: Any) -> None:
        self.hook, self.client = hook, hook.client

    def of(self, raw: dict) -> list[str]:
        return [raw.get("KeyName") or ""]

    def make(self, name: str, params: dict[str, Any]) -> None:
        """Imported from a public key whose private half is dropped at once, so no private key exists
        anywhere (CreateKeyPair would send one back, for a debug log to print): pilots need no SSH login.
        An existing one is this launch's (a retry)."""
        public = marker_public_key()
        try:
            self.hook.api_call(lambda: self.client.import_key_pair(KeyName=name, PublicKeyMaterial=public),
                               "import_key_pair", charge=False)
        except Exception as exc:
            if _code(exc) != "InvalidKeyPair.Duplicate":
                raise
        params["KeyName"] = name

    def at_provider(self, prefix: str) -> dict[str, str]:
        pairs = self.hook.api_call(lambda: self.client.describe_key_pairs(), "describe_key_pairs", charge=False)
        return {k["KeyName"]: k["KeyName"] for k in pairs.get("KeyPairs", []) if k.get("KeyName", "").startswith(prefix)}

    def delete(self, handle: str) -> bool:
        self.hook.api_call(lambda: self.client.delete_key_pair(KeyName=handle), "delete_key_pair", charge=False)
        return True


class SecurityGroupMarker:
    kind = "security_group"

    def __init__(self, hook: Any) -> None:
        self.hook, self.client = hook, hook.client

    def of(self, raw: dict) -> list[str]:
        return [g.get("GroupName") or "" for g in raw.get("SecurityGroups", [])]

    def make(self, name: str, params: dict[str, Any]) -> None:
        """An empty group (no rule: it allows nothing) next to the entry's own; an existing one is reused."""
        found = self.at_provider(name)
        if name in found:
            group = found[name]
        else:
            kwargs = {"GroupName": name, "Description": "glidein launch marker"}
            subnet = self.hook.entry.options.get("subnet_id")
            if subnet:  # the group must be in the subnet's VPC
                kwargs["VpcId"] = self.client.describe_subnets(SubnetIds=[subnet])["Subnets"][0]["VpcId"]
            group = self.hook.api_call(lambda: self.client.create_security_group(**kwargs), "create_security_group",
                                       charge=False)["GroupId"]
        params["SecurityGroupIds"] = [*params.get("SecurityGroupIds", []), group]

    def at_provider(self, prefix: str) -> dict[str, str]:
        groups = self.hook.api_call(lambda: self.client.describe_security_groups(), "describe_security_groups",
                                    charge=False)
        return {g["GroupName"]: g["GroupId"] for g in groups.get("SecurityGroups", [])
                if g.get("GroupName", "").startswith(prefix)}

    def delete(self, handle: str) -> bool:
        """False while an instance still holds the group (DependencyViolation): tried again next cycle."""
        try:
            self.hook.api_call(lambda: self.client.delete_security_group(GroupId=handle), "delete_security_group",
                               charge=False)
        except Exception as exc:
            if _code(exc) == "DependencyViolation":
                return False
            raise
        return True


MARKERS = {m.kind: m for m in (KeyPairMarker, SecurityGroupMarker)}


def marker_public_key() -> bytes:
    """An OpenSSH RSA public key nobody holds the private key of (RSA: what every EC2 API imports)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
