"""The resolver every DNS look-up of MailGrave uses: ``remote.dns`` from mailgrave.yaml.

Imported only by code that looks something up (dnspython is not on
mailgrave-smtpd's per-connection path unless a session checks its sender).
"""

from __future__ import annotations

from dns import resolver as dns_resolver

from mailgrave import config as configmod


def resolver(config: configmod.Config) -> dns_resolver.Resolver:
    """A resolver on ``remote.dns`` (the system's when no nameservers are set);
    ``remote.dns.timeout`` bounds each look-up."""
    dns = config.remote.dns
    if dns.nameservers:
        res = dns_resolver.Resolver(configure=False)
        res.nameservers = list(dns.nameservers)
    else:
        res = dns_resolver.Resolver()
    res.port = dns.port
    res.timeout = res.lifetime = dns.timeout
    return res
