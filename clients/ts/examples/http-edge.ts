// Calls the server's HTTP edge as a browser does, over Connect and over gRPC-Web (HTTP/1.1, the
// transports @connectrpc/connect-web has; connect-node's are the same protocols for Node): signs
// in, reads the user, and shows the ErrorInfo reason of a refused call and of a refused server
// stream (WatchUserChanges is for admins and machine callers), on each transport.
//
//   EXAMPLE_PASSWORD=... node dist/examples/http-edge.js http://localhost:9464 jane
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-node";

import { createUserServiceClient, errorReason } from "../src/index.js";

const [baseUrl = "http://localhost:9464", identifier = ""] = process.argv.slice(2);

for (const [name, transport] of [
  ["connect", createConnectTransport({ baseUrl, httpVersion: "1.1" })],
  ["grpc-web", createGrpcWebTransport({ baseUrl, httpVersion: "1.1" })],
] as const) {
  const client = createUserServiceClient(baseUrl, transport);
  const session = await client.authenticate({ identifier, password: process.env.EXAMPLE_PASSWORD ?? "" });
  const headers = { authorization: `Bearer ${session.accessToken}` };
  const { user } = await client.getUser({ userId: session.user?.id }, { headers });
  console.log(`${name}: signed in as ${user?.username} (${user?.id})`);
  try {
    await client.getUserByIdentifier({ identifier }, { headers });
  } catch (error) {
    console.log(`${name}: GetUserByIdentifier refused: ${errorReason(error)}`);
  }
  try {
    for await (const { change } of client.watchUserChanges({}, { headers })) {
      console.log(`${name}: WatchUserChanges delivered ${change?.cursor}`);
      break;
    }
  } catch (error) {
    console.log(`${name}: WatchUserChanges refused: ${errorReason(error)}`);
  }
}
