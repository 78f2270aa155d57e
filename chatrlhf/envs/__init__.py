"""Gymnasium environments: chat as an RL environment for other RL libraries (see `chatrlhf.envs.chat`).

Importing this package registers `chatrlhf/Chat-v0`. Gymnasium 1.x finds environments only through imports (it has
no entry-point plugin loader, unlike Gymnasium 0.x), so either `import chatrlhf.envs` before
`gymnasium.make("chatrlhf/Chat-v0", ...)`, or let gymnasium import it:
`gymnasium.make("chatrlhf.envs:chatrlhf/Chat-v0", ...)`.
"""

import gymnasium

from chatrlhf.envs.chat import ChatEnv, escape_text, unescape_text

CHAT_ENV_ID = "chatrlhf/Chat-v0"


def register_envs() -> None:
    """Register chatrlhf's environments with gymnasium; calling it again does nothing (no override warning)."""
    if CHAT_ENV_ID not in gymnasium.registry:
        gymnasium.register(id=CHAT_ENV_ID, entry_point="chatrlhf.envs.chat:ChatEnv")


register_envs()

__all__ = ["CHAT_ENV_ID", "ChatEnv", "escape_text", "register_envs", "unescape_text"]
