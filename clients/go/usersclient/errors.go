package usersclient

import (
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/status"

	usersv1 "github.com/users-grpc/users-grpc/clients/go/users/v1"
)

// ErrorDomain is the ErrorInfo domain of every error the service sends.
const ErrorDomain = "users.v1"

// Reason is the ErrorInfo reason of a refused call ("MFA_REQUIRED", ...), or "" if err carries
// none from this service.
func Reason(err error) string {
	s, ok := status.FromError(err)
	if !ok {
		return ""
	}
	for _, detail := range s.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok && info.GetDomain() == ErrorDomain {
			return info.GetReason()
		}
	}
	return ""
}

// ReasonEnum is Reason as the contract's enum: ERROR_REASON_UNSPECIFIED for none, or for a
// reason this client's contract does not know (a newer server's); act on the status code then.
func ReasonEnum(err error) usersv1.ErrorReason {
	reason := Reason(err)
	if reason == "" {
		return usersv1.ErrorReason_ERROR_REASON_UNSPECIFIED
	}
	// A missing key is 0, ERROR_REASON_UNSPECIFIED.
	return usersv1.ErrorReason(usersv1.ErrorReason_value["ERROR_REASON_"+reason])
}
