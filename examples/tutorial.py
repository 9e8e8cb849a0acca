"""
C{TutorialService.AddOne {value: int32} -> {value: value + 1}}, version 1,
region Development: Go Skynet's tutorial service.
"""

from skynet.errors import ServiceError
from skynet.service import Service


class TutorialService(Service):
    name = "TutorialService"
    version = "1"
    region = "Development"

    def AddOne(self, request_info, params):
        value = params.get("value")
        if not isinstance(value, int) or isinstance(value, bool):
            raise ServiceError("AddOne needs an integer 'value'")
        return {"value": value + 1}
