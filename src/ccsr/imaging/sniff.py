"""Format sniffing from magic bytes. The file name, extension and Content-Type are never consulted."""

from __future__ import annotations


def sniff_format(data: bytes) -> str | None:
    """Return the Pillow format name ("PNG", "JPEG", "WEBP", "GIF", "TIFF", "AVIF", "BMP") or None."""
    head = data[:32]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*"):  # classic TIFF only (BigTIFF is not accepted)
        return "TIFF"
    if head[4:8] == b"ftyp" and _ftyp_brands(data) & {b"avif", b"avis"}:
        return "AVIF"
    if head[:2] == b"BM":
        return "BMP"  # recognised so the error can name it; not in the default allow-list
    return None


def _ftyp_brands(data: bytes) -> set[bytes]:
    """Major and compatible brands of an ISO-BMFF ``ftyp`` box (AVIF files may lead with "mif1")."""
    size = int.from_bytes(data[:4], "big")
    end = min(max(size, 16), len(data), 256)
    return {data[8:12]} | {data[i : i + 4] for i in range(16, end - 3, 4)}

