"""Domain names as the bid rules compare them: lower case, a domain standing for its subdomains."""
from __future__ import annotations


def domain_and_parents(domain: str | None) -> list[str]:
    """``www.News.example`` -> ``["www.news.example", "news.example", "example"]``: a listed
    domain matches itself and its subdomains, whatever the case."""
    if not domain:
        return []
    labels = domain.strip().lower().strip(".").split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


URL_PARTS = "/:@?#"


def host_of(url: str | None) -> str | None:
    """The host of ``https://user@Host.example:8443/path?q`` (scheme optional): ``Host.example``."""
    if not url:
        return None
    if not any(c in url for c in URL_PARTS) and not url[0].isspace() and not url[-1].isspace():
        return url  # already a bare host name: the common case, kept cheap
    rest = url.strip().partition("//")[2] or url.strip()
    host = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0].rpartition("@")[2]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host or None
