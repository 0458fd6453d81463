"""placeholder replaced below"""
import threading
from typing import Optional
from server.settings import Settings


def start_thread(settings: Settings, stop_event: Optional[threading.Event] = None) -> None:
    return None
