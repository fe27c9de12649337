// users.v1.UserService for Node: the generated messages and service (protobuf-es; call it
// with @connectrpc/connect over the gRPC protocol), the google.rpc error details, a local
// access-token verifier and the ErrorInfo reason of a refused call.
import { createClient, type Client, ConnectError, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";
import { ErrorReason } from "./gen/users/v1/error_reason_pb.js";
import { UserService } from "./gen/users/v1/user_service_pb.js";

export * from "./gen/users/v1/error_reason_pb.js";
export * from "./gen/users/v1/group_pb.js";
export * from "./gen/users/v1/service_account_token_pb.js";
export * from "./gen/users/v1/session_pb.js";
export * from "./gen/users/v1/user_pb.js";
export * from "./gen/users/v1/user_service_pb.js";
export * from "./gen/google/rpc/error_details_pb.js";
export { TokenVerifier, type AccessClaims, InvalidTokenError, REFETCH_INTERVAL_MS } from "./verifier.js";

export type UserServiceClient = Client<typeof UserService>;

/** A client over gRPC (HTTP/2); `baseUrl` is "http://host:port", or "https://..." for TLS. */
export function createUserServiceClient(baseUrl: string, transport?: Transport): UserServiceClient {
  return createClient(UserService, transport ?? createGrpcTransport({ baseUrl }));
}

/** The ErrorInfo domain of every error the service sends. */
export const ERROR_DOMAIN = "users.v1";

/** The ErrorInfo reason of a refused call ("MFA_REQUIRED", ...), or "" if it carries none. */
export function errorReason(error: unknown): string {
  const info = ConnectError.from(error)
    .findDetails(ErrorInfoSchema)
    .find((detail) => detail.domain === ERROR_DOMAIN);
  return info?.reason ?? "";
}

/** errorReason as the contract's enum: UNSPECIFIED for none or for one this client does not know. */
export function errorReasonEnum(error: unknown): ErrorReason {
  // protobuf-es drops the enum's ERROR_REASON_ prefix: the names are the reasons.
  const value: unknown = (ErrorReason as unknown as Record<string, unknown>)[errorReason(error)];
  return typeof value === "number" ? value : ErrorReason.UNSPECIFIED;
}
