"""Reading systemd unit files in tests."""

__all__ = ["parse_unit"]


def parse_unit(text: str) -> dict:
    """``{section: {key: [values...]}}``; repeated keys keep every value."""
    sections: dict = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections
