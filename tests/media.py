"""Bad-input media files that tests write on the fly (shared by unit and integration tests)."""
import numpy as np


def unknown_codec_mkv(path: str) -> str:
    """A real mkv whose codec id is rewritten to one FFmpeg has no decoder for."""
    import av

    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for _ in range(9):
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    data = open(path, "rb").read()
    assert data.count(b"V_MPEG4/ISO/ASP") == 1
    open(path, "wb").write(data.replace(b"V_MPEG4/ISO/ASP", b"V_SORA/UNKNOWNX"))
    return path
