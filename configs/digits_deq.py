"""DEQ (Anderson forward, implicit gradient) on the embedded digits. Same as the default."""

from configs import default


def get_config():
    return default.get_config()
