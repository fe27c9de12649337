// Signs in, reads the user with the access token, verifies that token locally, and shows the
// ErrorInfo reason of a refused call.
//
//   EXAMPLE_PASSWORD=... node dist/examples/quickstart.js localhost:50051 jane
//
// Plaintext, as in the README's walk-through; EXAMPLE_ISSUER and EXAMPLE_AUDIENCE are the
// server's USERS_JWT_ISSUER and USERS_JWT_AUDIENCE (default users-grpc).
import { Code, ConnectError } from "@connectrpc/connect";

import { createUserServiceClient, errorReason, TokenVerifier } from "../src/index.js";

const [address = "localhost:50051", identifier = ""] = process.argv.slice(2);
const issuer = process.env.EXAMPLE_ISSUER ?? "users-grpc";
const audience = process.env.EXAMPLE_AUDIENCE ?? "users-grpc";

const client = createUserServiceClient(`http://${address}`);
const session = await client.authenticate({ identifier, password: process.env.EXAMPLE_PASSWORD ?? "" });
console.log(`signed in as ${session.user?.username} (${session.user?.id})`);

const headers = { authorization: `Bearer ${session.accessToken}` };
const { user } = await client.getUser({ userId: session.user?.id }, { headers });
console.log(`GetUser: ${user?.username} <${user?.email}>`);

const verifier = new TokenVerifier(client, issuer, audience);
const claims = await verifier.verify(session.accessToken);
console.log(`verified locally: sub=${claims.subject} role=${claims.role} sid=${claims.sessionId}`);

// Looking users up by name is for admins and machine callers: a user's token is refused.
try {
  await client.getUserByIdentifier({ identifier }, { headers });
  throw new Error("GetUserByIdentifier was not refused");
} catch (error) {
  if (!(error instanceof ConnectError)) throw error;
  console.log(`refused: code=${Code[error.code]} reason=${errorReason(error)}`);
}
