// The token verifier against keys of its own: it caches the key set, fetches it again on an
// unknown kid at most once per interval, and refuses what is not a user's access token.
// Run with `node --test dist/test/` after `npm run build`.
import assert from "node:assert/strict";
import { generateKeyPairSync } from "node:crypto";
import test from "node:test";

import { exportJWK, SignJWT } from "jose";

import { TokenVerifier, type UserServiceClient } from "../src/index.js";

class KeyServer {
  keys = new Map<string, ReturnType<typeof generateKeyPairSync>>();
  fetches = 0;

  add(kid: string): void {
    this.keys.set(kid, generateKeyPairSync("ec", { namedCurve: "P-256" }));
  }

  client(): UserServiceClient {
    return {
      getPublicKeys: async () => {
        this.fetches++;
        const keys = await Promise.all(
          [...this.keys].map(async ([kid, pair]) => ({ ...(await exportJWK(pair.publicKey)), kid, alg: "ES256", use: "sig" })),
        );
        return { jwksJson: JSON.stringify({ keys }) };
      },
    } as unknown as UserServiceClient;
  }

  sign(kid: string, claims: Record<string, unknown> = {}, audience = "users-grpc"): Promise<string> {
    const now = Math.floor(Date.now() / 1000);
    return new SignJWT({ role: "user", sid: "b".repeat(24), ver: 0, ...claims })
      .setProtectedHeader({ alg: "ES256", typ: "at+jwt", kid })
      .setIssuer("users-grpc")
      .setAudience(audience)
      .setSubject("a".repeat(24))
      .setJti("j")
      .setIssuedAt(now)
      .setExpirationTime(now + 900)
      .sign(this.keys.get(kid)!.privateKey);
  }
}

test("caches the key set and fetches it again on an unknown kid, at most once per interval", async () => {
  const server = new KeyServer();
  server.add("one");
  const verifier = new TokenVerifier(server.client(), "users-grpc", "users-grpc");
  for (let i = 0; i < 2; i++) {
    const claims = await verifier.verify(await server.sign("one"));
    assert.equal(claims.role, "user");
    assert.equal(claims.sessionId, "b".repeat(24));
  }
  assert.equal(server.fetches, 1);

  server.add("two");
  const rotated = await server.sign("two");
  await assert.rejects(verifier.verify(rotated), { name: "InvalidTokenError" });
  assert.equal(server.fetches, 1);
  (verifier as unknown as { lastFetch: number }).lastFetch = 0;
  assert.equal((await verifier.verify(rotated)).subject, "a".repeat(24));
  assert.equal(server.fetches, 2);
});

test("refuses other audiences, unknown roles, missing claims and forgeries", async () => {
  const server = new KeyServer();
  server.add("one");
  const verifier = new TokenVerifier(server.client(), "users-grpc", "users-grpc");
  const refused = [
    await server.sign("one", {}, "users-grpc:service-accounts"),
    await server.sign("one", { role: "superuser" }),
    await server.sign("one", { ver: undefined }),
    await server.sign("one", { sid: undefined }),
    "not a token",
  ];
  const [header, payload] = (await server.sign("one")).split(".");
  const none = Buffer.from(JSON.stringify({ alg: "none", typ: "at+jwt", kid: "one" })).toString("base64url");
  refused.push(`${none}.${payload}.`, `${header}.${Buffer.from('{"role":"admin"}').toString("base64url")}.x`);
  for (const token of refused) {
    await assert.rejects(verifier.verify(token), { name: "InvalidTokenError" }, token);
  }
});
