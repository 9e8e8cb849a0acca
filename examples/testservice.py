"""
C{TestService.Upcase {data: str} -> {data: upper-cased}}.

    twistd -n --pidfile= skynet-service --service examples.testservice:TestService
"""

from skynet.errors import ServiceError
from skynet.service import Service


class TestService(Service):
    """
    The smallest useful service.
    """

    name = "TestService"

    def Upcase(self, request_info, params):
        data = params.get("data")
        if not isinstance(data, str):
            raise ServiceError("Upcase needs a string 'data'")
        return {"data": data.upper()}
